"""FleetState, the view and the Prometheus exporter, fed with wire payloads, no broker."""

from __future__ import annotations

import re
import threading

import pytest

from edgefl.monitor import FleetState
from edgefl.monitor.exporter import FleetCollector
from edgefl.monitor.view import render_text, sparkline
from edgefl.topics import Topics
from edgefl.wire import Status, encode_metrics, encode_status

T = Topics()


def status(node: str, sender: str, **fields: object) -> tuple[str, bytes]:
    return T.status(node, sender), encode_status(Status(id=sender, **fields))  # type: ignore[arg-type]


def metrics(role: str, sender: str, **fields: object) -> tuple[str, bytes]:
    return T.metrics(role, sender), encode_metrics(role, sender, fields)  # type: ignore[arg-type]


@pytest.fixture
def fleet() -> FleetState:
    state = FleetState()
    for topic, payload in (
        status("gw-1", "dev-1", online=True, battery=0.42, charging=False, link="wifi",
               buffered=3, model_version=7),
        status("gw-1", "dev-2", online=True, battery=None, link="ethernet", buffered=0,
               eligible=False, reason="low_battery"),
        status("cloud", "gw-1", online=True, role="gateway"),
        metrics("gateway", "gw-1", round=12, version=13, participants=2, selected=3,
                samples=640, rejected_bad_signature=2, rejected_stale=1, rejected_total=3),
        metrics("cloud", "cloud", round=4, version=5, participants=1, accuracy=0.8125,
                loss=0.61),
        metrics("device", "dev-1", event="round", round=12, version=12, loss=0.25,
                buffered=1, rounds_trained=9),
    ):  # fmt: skip
        assert state.apply(topic, payload)
    return state


def test_statuses_and_metrics_build_per_node_and_per_device_views(fleet: FleetState) -> None:
    gw, cloud = fleet.nodes["gw-1"], fleet.nodes["cloud"]
    assert (gw.role, gw.parent, gw.online) == ("gateway", "cloud", True)
    assert gw.figures == {"round": 12, "version": 13, "participants": 2, "selected": 3,
                          "samples": 640}  # fmt: skip
    assert gw.rejected == {"bad_signature": 2, "stale": 1}
    assert gw.rejected_total == 3
    assert cloud.role == "cloud" and cloud.figures["accuracy"] == 0.8125
    d1, d2 = fleet.devices["dev-1"], fleet.devices["dev-2"]
    assert (d1.gateway, d1.online, d1.battery, d1.link) == ("gw-1", True, 0.42, "wifi")
    assert (d1.model_version, d1.last_round, d1.loss, d1.rounds_trained) == (7, 12, 0.25, 9)
    assert d1.buffered == 1  # the metrics record is newer than the status
    assert (d2.battery, d2.eligible, d2.reason) == (None, False, "low_battery")
    assert [n.id for n in fleet.sorted_nodes()] == ["cloud", "gw-1"]


def test_last_will_marks_a_device_offline_and_keeps_its_last_profile(fleet: FleetState) -> None:
    fleet.apply(*status("gw-1", "dev-1", online=False))
    dev = fleet.devices["dev-1"]
    assert dev.online is False
    assert (dev.battery, dev.link, dev.model_version) == (0.42, "wifi", 7)


def test_a_cleared_retained_status_forgets_the_device(fleet: FleetState) -> None:
    assert fleet.apply(T.status("gw-1", "dev-2"), b"")
    assert "dev-2" not in fleet.devices


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("other/metrics/device/dev-1", b"{}"),
        ("edgefl/gw-1/model", b"\x80"),
        ("edgefl/gw-1/update/dev-1", b"\x80"),
        ("edgefl/metrics/robot/r-1", b"{}"),
        ("edgefl/gw-1/status/dev-1", b"not json"),
        ("edgefl/gw-1/status/dev-1", b"[1, 2]"),
    ],
)
def test_foreign_and_malformed_messages_are_ignored_and_counted(
    fleet: FleetState, topic: str, payload: bytes
) -> None:
    before = fleet.snapshot()
    assert not fleet.apply(topic, payload)
    after = fleet.snapshot()
    assert after["ignored"] == before["ignored"] + 1
    assert after["nodes"] == before["nodes"] and after["devices"] == before["devices"]


def test_wrongly_typed_fields_are_dropped_not_trusted() -> None:
    state = FleetState()
    state.apply(T.status("gw-1", "dev-1"), b'{"online": "yes", "battery": "full", "buffered": 2}')
    state.apply(
        T.metrics("gateway", "gw-1"), b'{"round": "7", "participants": 3, "accuracy": null}'
    )
    dev, gw = state.devices["dev-1"], state.nodes["gw-1"]
    assert (dev.online, dev.battery, dev.buffered) == (None, None, 2)
    assert gw.figures == {"participants": 3}


def test_a_reannounced_round_updates_rejections_but_not_the_last_rounds_figures(
    fleet: FleetState,
) -> None:
    fleet.apply(*metrics("gateway", "gw-1", event="reannounce", round=13, version=13,
                         participants=0, rejected_stale=4, rejected_total=6))  # fmt: skip
    gw = fleet.nodes["gw-1"]
    assert (gw.figures["round"], gw.figures["participants"]) == (12, 2)
    assert gw.rejected == {"bad_signature": 2, "stale": 4}


def test_a_gateways_status_reports_its_queued_syncs(fleet: FleetState) -> None:
    fleet.apply(*status("cloud", "gw-1", online=True, role="gateway", buffered=5))
    assert fleet.nodes["gw-1"].buffered == 5
    fleet.apply(*status("cloud", "gw-1", online=False, role="gateway"))
    assert (fleet.nodes["gw-1"].online, fleet.nodes["gw-1"].buffered) == (False, 5)


def test_accuracy_history_keeps_one_point_per_round() -> None:
    state = FleetState()
    for round_, acc in [(0, 0.2), (1, 0.5), (1, 0.55), (2, 0.9)]:
        state.apply(*metrics("cloud", "cloud", round=round_, accuracy=acc))
    assert state.nodes["cloud"].accuracy_history == [0.2, 0.55, 0.9]


def test_sparkline_draws_the_last_values_on_the_0_to_1_scale() -> None:
    assert sparkline([0.7, 0.7]) == "▆▆"
    assert sparkline([]) == ""
    assert len(sparkline([i / 100 for i in range(100)], width=30)) == 30


def test_text_view_shows_the_figures(fleet: FleetState) -> None:
    for r, acc in enumerate([0.3, 0.6]):
        fleet.apply(*metrics("cloud", "cloud", round=5 + r, accuracy=acc))
    text = render_text(fleet, width=200)
    assert "bad_signature 2" in text and "stale 1" in text
    assert "2/3" in text  # participants of selected
    assert "42%" in text and "low_battery" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "0.600" in rows["cloud"] and "▇▃▅" in rows["cloud"]  # last accuracy, history
    assert "12" in rows["dev-1"] and "wifi" in rows["dev-1"]


def test_prometheus_collector_exports_what_the_topics_carried(fleet: FleetState) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet, threading.Lock()))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    expected = [
        'edgefl_round{node="gw-1",role="gateway"} 12.0',
        'edgefl_participants{node="gw-1",role="gateway"} 2.0',
        'edgefl_accuracy{node="cloud",role="cloud"} 0.8125',
        'edgefl_rejected_total{node="gw-1",reason="bad_signature",role="gateway"} 2.0',
        'edgefl_node_online{node="gw-1",role="gateway"} 1.0',
        'edgefl_device_online{device="dev-1",gateway="gw-1"} 1.0',
        'edgefl_device_battery{device="dev-1",gateway="gw-1"} 0.42',
        'edgefl_device_buffered{device="dev-1",gateway="gw-1"} 1.0',
        'edgefl_device_last_round{device="dev-1",gateway="gw-1"} 12.0',
    ]
    for line in expected:
        assert line in text, line
    assert 'edgefl_device_battery{device="dev-2"' not in text  # unknown, not zero
    assert re.search(r"^# TYPE edgefl_rejected(_total)? counter$", text, re.MULTILINE)


def test_monitor_command_refuses_a_bad_broker_address_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgefl.cli import main

    assert main(["monitor", "--broker", "no-port", "--once"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgefl monitor: error: broker") and "\n" not in err


def test_accuracy_is_kept_per_version_and_byte_counters_as_they_come() -> None:
    state = FleetState()
    for rnd, version, acc in ((1, 2, 0.5), (2, 3, 0.75), (2, 3, 0.8), (3, 3, 0.85)):
        counters = {"children_bytes_up": 100 * rnd, "round_bytes_down": 7}
        state.apply(*metrics("cloud", "cloud", round=rnd, version=version, accuracy=acc,
                             clipped=1, **counters))  # fmt: skip
    state.apply(*metrics("device", "dev-1", round=3, bytes_up=50, round_bytes_up=20))
    cloud = state.nodes["cloud"]
    assert cloud.accuracy_by_version == {2: 0.5, 3: 0.85}
    assert cloud.accuracy_history == [0.5, 0.8, 0.85]
    assert (cloud.figures["children_bytes_up"], cloud.figures["round_bytes_down"]) == (300, 7)
    assert cloud.figures["clipped"] == 1
    assert state.devices["dev-1"].bytes == {"bytes_up": 50, "round_bytes_up": 20}
    # A node cannot grow the state with made-up fields.
    state.apply(*metrics("cloud", "cloud", round=4, version=4, bytes_made_up=1, **{
        f"bytes_{i}": 1 for i in range(100)}))  # fmt: skip
    assert not [k for k in cloud.figures if "made_up" in k or k[-1].isdigit()]
