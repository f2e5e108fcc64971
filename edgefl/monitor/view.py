"""The terminal view of a FleetState: rich tables and accuracy sparklines.

Rendering only reads the state; rich is imported when a view is drawn.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from typing import Any

from .state import FleetState

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Iterable[float], width: int = 30, *, lo: float = 0.0, hi: float = 1.0) -> str:
    """The last ``width`` values as block characters on the fixed scale ``lo..hi``
    (accuracy: 0..1), values outside it clipped: scaled to their own min..max, a
    wobble of 0.969-0.975 would draw as a collapse."""
    points = list(values)[-width:]
    top = len(SPARK) - 1
    span = hi - lo
    return "".join(SPARK[round((min(max(v, lo), hi) - lo) / span * top)] for v in points)


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _yes(value: bool | None, yes: str = "yes", no: str = "no") -> str:
    return "-" if value is None else (yes if value else no)


def render(state: FleetState, *, max_devices: int = 40, title: str = "edgefl fleet") -> Any:
    """A rich renderable of ``state`` (rich is imported here: the CLI starts fast)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    online = sum(1 for d in state.devices.values() if d.online)
    header = Text.assemble(
        (title, "bold"),
        f"  {len(state.nodes)} nodes, {len(state.devices)} devices ({online} online)",
        f"  {time.strftime('%H:%M:%S')}",
    )
    nodes = Table(title="nodes", title_justify="left", expand=False)
    for col in ("node", "role", "online", "children", "round", "version", "participants",
                "accuracy", "loss", "round ms", "sync queue", "rejected",
                "accuracy history"):  # fmt: skip
        nodes.add_column(col, justify="right" if col not in ("node", "role") else "left")
    for n in state.sorted_nodes():
        f = n.figures
        participants = _fmt(f.get("participants"))
        if f.get("selected"):
            participants += f"/{_fmt(f.get('selected'))}"
        children = f"{_fmt(f.get('children_online'))}/{_fmt(f.get('children_known'))}"
        rejected = ", ".join(f"{r} {c}" for r, c in sorted(n.rejected.items()) if c) or "0"
        nodes.add_row(
            n.id, n.role, _yes(n.online), children, _fmt(f.get("round")),
            _fmt(f.get("version")), participants, _fmt(f.get("accuracy"), 3),
            _fmt(f.get("loss"), 3), _fmt(f.get("round_ms")), _fmt(n.buffered), rejected,
            sparkline(n.accuracy_history),
        )  # fmt: skip
    devices = Table(title="devices", title_justify="left", expand=False)
    for col in ("device", "gateway", "online", "battery", "link", "buffered", "model",
                "last round", "loss", "eligible"):  # fmt: skip
        devices.add_column(col, justify="left" if col in ("device", "gateway", "link") else "right")
    shown = state.sorted_devices()
    for d in shown[:max_devices]:
        battery = "-" if d.battery is None else f"{d.battery * 100:.0f}%"
        if d.charging and d.battery is not None:
            battery += "+"
        eligible = _yes(d.eligible) if not d.reason else d.reason
        devices.add_row(
            d.id, d.gateway or "?", _yes(d.online), battery, d.link or "-", _fmt(d.buffered),
            _fmt(d.model_version), _fmt(d.last_round), _fmt(d.loss, 3), eligible,
        )  # fmt: skip
    if len(shown) > max_devices:
        devices.add_row(f"... {len(shown) - max_devices} more", *[""] * 9)
    return Group(header, nodes, devices)


def render_text(state: FleetState, *, width: int = 160, max_devices: int = 40) -> str:
    """``render`` as plain text (``--once``, tests)."""
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(
        render(state, max_devices=max_devices)
    )
    return out.getvalue()
