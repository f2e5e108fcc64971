"""From metrics records to history rows, the summary, the files and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from edgefl.simulator.history import History, summarize
from edgefl.simulator.progress import round_line
from edgefl.simulator.report import (
    PLOTS,
    plot_history,
    print_summary,
    read_history_csv,
    summary_lines,
    write_history,
    write_summary,
)

MODEL_BYTES = 1000


def gateway(gid: str, **fields: Any) -> dict[str, Any]:
    doc = {
        "role": "gateway",
        "id": gid,
        "event": "round",
        "updates": 10,
        "participants": 10,
        "children_known": 10,
        "children_online": 10,
        "samples": 360,
        "bytes_in": 10 * 500,
        "staleness_max": 0,
    }
    return {**doc, **fields}


def cloud(version: int, accuracy: float, ts: float, **fields: Any) -> dict[str, Any]:
    doc = {
        "role": "cloud",
        "id": "cloud",
        "event": "round",
        "version": version,
        "participants": 2,
        "children_online": 2,
        "bytes_in": 2 * 600,
        "accuracy": accuracy,
        "loss": 1 - accuracy,
        "ts": ts,
    }
    return {**doc, **fields}


def feed_two_rounds() -> History:
    h = History(devices=20, gateways=2, model_bytes=MODEL_BYTES, started=100.0)
    d1 = {"role": "device", "id": "d1", "event": "round", "bytes_up": 600, "bytes_down": 2000}
    assert h.feed(d1) is None
    assert h.feed(gateway("gw-1", bytes_up=300, bytes_down=1000)) is None
    assert (
        h.feed(gateway("gw-2", rejected_norm=2, rejected_stale=1, bytes_up=300, bytes_down=1000))
        is None
    )
    assert h.feed({"role": "gateway", "id": "gw-1", "event": "reannounce"}) is None
    first = h.feed(cloud(1, 0.5, 103.0))
    assert first is not None
    h.feed({**d1, "bytes_up": 1000, "bytes_down": 2500})
    h.feed(
        gateway("gw-1", participants=6, updates=6, children_online=8, bytes_up=700, bytes_down=2000)
    )
    h.feed(gateway("gw-2", rejected_norm=5, rejected_stale=1))
    declined = {"role": "device", "id": "d2", "event": "declined", "reason": "battery_low"}
    h.feed({**declined, "bytes_up": 50, "bytes_down": 400})
    assert h.feed(cloud(2, 0.75, 104.5)) is not None
    return h


def test_a_cloud_round_closes_a_row_of_what_the_gateways_did_since() -> None:
    h = feed_two_rounds()
    first, second = h.rows
    assert first["round"] == 1 and second["round"] == 2
    assert first["elapsed_s"] == 3.0 and second["elapsed_s"] == 4.5
    assert first["gateway_rounds"] == 2
    assert first["device_updates"] == 20
    assert first["participation"] == 1.0
    # Measured: what the devices and gateways counted since the previous cloud round.
    assert (first["bytes_up_device"], first["bytes_down_device"]) == (600, 2000)
    assert (first["bytes_up_gateway"], first["bytes_down_gateway"]) == (600, 2000)
    assert (second["bytes_up_device"], second["bytes_down_device"]) == (450, 900)
    assert (second["bytes_up_gateway"], second["bytes_down_gateway"]) == (400, 1000)
    assert second["device_updates"] == 16
    assert second["participation"] == 16 / 20
    assert second["online"] == 18 / 20
    assert first["devices_trained"] == 1 and second["devices_trained"] == 1
    assert h.declined == {"battery_low": 1}


def test_cumulative_rejection_counters_become_per_round_differences() -> None:
    first, second = feed_two_rounds().rows
    assert first["rejected_norm"] == 2 and first["rejected_stale"] == 1
    assert first["rejected"] == 3
    assert second["rejected_norm"] == 3
    assert "rejected_stale" not in second
    assert second["rejected"] == 3


def test_the_summary_is_the_sum_of_the_rows() -> None:
    h = feed_two_rounds()
    tallies = [
        {"cohort": "a", "updates": 5, "buffered": 2, "late": 1, "pending": 1, "energy_wh": 0.5},
        {"cohort": "b", "updates": 3, "buffered": 0, "late": 0, "pending": 0, "energy_wh": None},
        {"cohort": "a", "updates": 2, "dropped": 1},
    ]
    s = summarize(h.rows, tallies, float32_update_bytes=2000, scenario="x")
    assert s["scenario"] == "x"
    assert s["rounds"] == 2
    assert s["final_accuracy"] == 0.75 and s["best_accuracy"] == 0.75
    for key in ("device_updates", "bytes_up_device", "bytes_up_gateway", "bytes_down_device"):
        assert s[key] == sum(r[key] for r in h.rows)
    assert s["bytes_per_update"] == s["bytes_up_device"] / s["device_updates"]
    assert s["compression_ratio"] == pytest.approx(2000 / s["bytes_per_update"])
    assert s["participation"] == pytest.approx((1.0 + 0.8) / 2)
    assert (s["updates_sent"], s["updates_buffered"], s["updates_late"]) == (10, 2, 1)
    assert s["cohorts"] == {
        "a": {"devices": 2, "updates_sent": 7, "pending": 1, "dropped": 1},
        "b": {"devices": 1, "updates_sent": 3, "pending": 0, "dropped": 0},
    }
    assert s["energy_wh"] == 0.5
    assert s["rejected"] == {"norm": 5, "stale": 1}


def test_history_files_hold_one_row_per_round(tmp_path: Path) -> None:
    rows = feed_two_rounds().rows
    rows[0]["loss"] = math.nan
    csv_path, json_path = write_history(rows, tmp_path)
    from_csv = read_history_csv(csv_path)
    assert [int(r["round"]) for r in from_csv] == [1, 2]
    assert float(from_csv[1]["accuracy"]) == 0.75
    assert from_csv[0]["loss"] == ""
    assert from_csv[1]["rejected_stale"] == ""  # a column from another row stays empty
    from_json = json.loads(json_path.read_text())
    assert len(from_json) == 2 and from_json[0]["loss"] is None
    summary = write_summary({"rounds": 2, "x": math.inf}, tmp_path)
    assert json.loads(summary.read_text()) == {"rounds": 2, "x": None}


def test_plots_are_written_headless(tmp_path: Path) -> None:
    paths = plot_history(feed_two_rounds().rows, tmp_path, title="t")
    assert sorted(p.name for p in paths) == sorted(PLOTS)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000


def test_plain_summary_prints_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    s = summarize(feed_two_rounds().rows, [], float32_update_bytes=2000, scenario="x")
    print_summary(s, plain=True)
    out = capsys.readouterr().out
    labels = [label for label, _ in summary_lines(s)]
    assert all(label in out for label in labels)
    assert "final accuracy  0.7500" in out
    assert "norm 5, stale 1" in out


def test_rich_summary_renders_a_table() -> None:
    from rich.console import Console

    console = Console(record=True, width=120)
    s = summarize(feed_two_rounds().rows, [], float32_update_bytes=2000, scenario="x")
    print_summary(s, plain=False, console=console)
    text = console.export_text()
    assert "final accuracy" in text and "0.7500" in text


def test_a_round_line_says_accuracy_and_participation() -> None:
    row = feed_two_rounds().rows[1]
    line = round_line(row, 5)
    assert line.startswith("round 2/5")
    assert "accuracy 0.7500" in line and "participation 80%" in line and "rejected 3" in line
