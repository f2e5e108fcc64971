"""The end of a simulation: per-round history, the summary table, CSV/JSON files and plots.

Pure formatting and file writing over plain dicts: nothing here talks MQTT or
runs the fleet. Plots use matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Row = dict[str, Any]

#: Files a run leaves in its output folder.
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
SUMMARY_JSON = "summary.json"
PLOTS = ("accuracy.png", "bytes.png", "participation.png")


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of every row, first-seen order, so that a CSV header covers all rows."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def write_history(rows: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
    """``history.csv`` and ``history.json``: one row per cloud round."""
    out.mkdir(parents=True, exist_ok=True)
    header = columns(rows)
    csv_path = out / HISTORY_CSV
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    json_path = out / HISTORY_JSON
    json_path.write_text(json.dumps([_jsonable(r) for r in rows], indent=1) + "\n")
    return [csv_path, json_path]


def write_summary(summary: Mapping[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / SUMMARY_JSON
    path.write_text(json.dumps(_jsonable(summary), indent=1, sort_keys=False) + "\n")
    return path


def read_history_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else round(value, 6)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _jsonable(obj: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------- plots


def plot_history(rows: Sequence[Mapping[str, Any]], out: Path, title: str = "") -> list[Path]:
    """accuracy.png, bytes.png and participation.png per cloud round; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no plots (in the checkout: pip install '.[sim]')")
        return []
    out.mkdir(parents=True, exist_ok=True)
    rounds = [r.get("round") for r in rows]
    specs: list[tuple[str, str, list[tuple[str, str, float]]]] = [
        ("accuracy.png", "held-out accuracy", [("accuracy", "cloud model", 1.0)]),
        (
            "bytes.png",
            "MB per cloud round",
            [
                ("bytes_up_device", "device → gateway", 1e-6),
                ("bytes_up_gateway", "gateway → cloud", 1e-6),
                ("bytes_down_device", "gateway → devices", 1e-6),
                ("bytes_down_gateway", "cloud → gateways", 1e-6),
            ],
        ),
        (
            "participation.png",
            "share of devices",
            [("participation", "trained this round", 1.0), ("online", "online", 1.0)],
        ),
    ]
    written = []
    for name, ylabel, series in specs:
        fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=100)
        drawn = 0
        for key, label, factor in series:
            points = [
                (x, float(r[key]) * factor)
                for x, r in zip(rounds, rows, strict=True)
                if x is not None and _number(r.get(key)) is not None
            ]
            if points:
                xs = [p[0] for p in points]
                ys = [p[1] for p in points]
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
                drawn += 1
        ax.set_xlabel("cloud round")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title, fontsize=10)
        if name in ("accuracy.png", "participation.png"):
            ax.set_ylim(0, 1.02)
        if drawn > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------- the table


def human_bytes(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def summary_lines(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary, in reading order; printed as a table or lines."""
    s = summary
    acc = s.get("final_accuracy")
    lines = [
        ("scenario", f"{s.get('scenario')} ({s.get('devices')} devices, {s.get('gateways')} gw)"),
        ("broker", str(s.get("broker", "-"))),
        ("rounds", f"{s.get('rounds')} of {s.get('rounds_planned')} ({s.get('stopped', 'done')})"),
        ("wall time", f"{s.get('wall_s', 0):.1f} s"),
        ("final accuracy", "-" if acc is None else f"{acc:.4f}"),
        (
            "bytes up",
            f"devices→gateways {human_bytes(s.get('bytes_up_device'))}, "
            f"gateways→cloud {human_bytes(s.get('bytes_up_gateway'))}",
        ),
        (
            "bytes down",
            f"gateways→devices {human_bytes(s.get('bytes_down_device'))}, "
            f"cloud→gateways {human_bytes(s.get('bytes_down_gateway'))}",
        ),
        ("compression", _ratio(s.get("compression_ratio"))),
        ("participation", _percent(s.get("participation"))),
        (
            "updates",
            f"{s.get('updates_sent', 0)} sent, {s.get('updates_buffered', 0)} buffered offline, "
            f"{s.get('updates_late', 0)} delivered late",
        ),
        ("rejected", _reasons(s.get("rejected", {}))),
        ("energy used", _energy(s.get("energy_wh"))),
        ("energy (model)", _joules(s.get("energy_model_j"))),
    ]
    return lines


def _ratio(value: Any) -> str:
    v = _number(value)
    return "-" if v is None else f"{v:.2f}x smaller than float32"


def _percent(value: Any) -> str:
    v = _number(value)
    return "-" if v is None else f"{100 * v:.1f}% of device-rounds"


def _energy(value: Any) -> str:
    v = _number(value)
    return "-" if v is None else f"{v:.3f} Wh across the fleet"


def _joules(value: Any) -> str:
    v = _number(value)
    return "-" if v is None else f"{v:.1f} J over the devices' rounds (their power model)"


def _reasons(rejected: Mapping[str, Any]) -> str:
    parts = [f"{k} {v}" for k, v in sorted(rejected.items()) if v]
    return ", ".join(parts) if parts else "none"


def print_summary(summary: Mapping[str, Any], *, plain: bool, console: Any = None) -> None:
    """The summary as a rich table on a terminal, else as ``label: value`` lines."""
    lines = summary_lines(summary)
    if plain:
        width = max(len(label) for label, _ in lines)
        for label, value in lines:
            print(f"{label:<{width}}  {value}", flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="edgefl simulation", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in lines:
        table.add_row(label, value)
    (console or Console()).print(table)
