"""The terminal monitor: an honest accuracy scale, the cloud shown at once, old nodes
expired, and a clean exit on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from edgefl.monitor import FleetState
from edgefl.monitor.view import render_text, sparkline
from edgefl.topics import Topics
from edgefl.wire import Status, encode_metrics, encode_status

T = Topics()


def test_accuracy_is_drawn_on_a_fixed_scale_so_a_small_wobble_is_not_a_collapse() -> None:
    assert sparkline([0.969, 0.975, 0.972]) == "███"  # near the top, as accuracy is
    assert sparkline([0.1, 0.5, 0.9]) == "▂▅▇"
    assert sparkline([0.0, 1.0]) == "▁█"
    assert sparkline([-3.0, 7.0]) == "▁█"  # out of range is clipped to the scale
    assert sparkline([0.2, 0.4], lo=0.2, hi=0.4) == "▁█"


def test_the_cloud_is_listed_as_soon_as_a_gateway_names_it_as_parent() -> None:
    state = FleetState()
    state.apply(T.status("cloud", "gw-1"), encode_status(Status(role="gateway", online=True)))
    assert set(state.nodes) == {"cloud", "gw-1"}
    assert state.nodes["cloud"].role == "cloud" and state.nodes["gw-1"].parent == "cloud"
    assert [n.id for n in state.sorted_nodes()] == ["cloud", "gw-1"]
    state.apply(T.metrics("cloud", "cloud"), encode_metrics("cloud", "cloud", {"round": 3}))
    assert state.nodes["cloud"].figures["round"] == 3 and len(state.nodes) == 2
    assert "cloud" in render_text(state)


def test_nodes_and_devices_offline_longer_than_the_expiry_are_forgotten() -> None:
    state = FleetState()
    state.apply(T.status("gw-1", "dev-1"), encode_status(Status(online=False)), at=0.0)
    state.apply(T.status("gw-1", "dev-2"), encode_status(Status(online=True)), at=0.0)
    state.apply(
        T.status("cloud", "gw-2"), encode_status(Status(role="gateway", online=False)), at=100.0
    )
    assert state.expire(now=299.0, after_s=300.0) == 0
    assert state.expire(now=301.0, after_s=300.0) == 1  # dev-1, offline since 0
    assert set(state.devices) == {"dev-2"}  # online: kept, however old
    assert "gw-2" in state.nodes
    assert state.expire(now=401.0, after_s=300.0) == 1 and "gw-2" not in state.nodes
    state.apply(T.status("gw-1", "dev-2"), encode_status(Status(online=False)), at=500.0)
    assert state.expire(now=700.0, after_s=0) == 0  # 0: never


def test_sigterm_stops_the_monitor_with_exit_code_0() -> None:
    monitor = subprocess.Popen(
        [sys.executable, "-m", "edgefl.cli", "monitor", "--broker", "127.0.0.1:9", "--no-view"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    running = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert monitor.stderr is not None
        for line in monitor.stderr:
            lines.append(line)
            if "retrying" in line:  # its session is up and trying the broker
                running.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert running.wait(30), "".join(lines)
        monitor.send_signal(signal.SIGTERM)
        assert monitor.wait(30) == 0, "".join(lines)[-500:]
    finally:
        monitor.kill()
        reader.join(10)
