"""The shipped Grafana dashboard asks only for what ``edgefl monitor --prometheus`` serves.

Every metric name and label in the panels' PromQL must be in the exporter's
output for a fleet that reported every figure. (Prometheus itself runs the same
expressions in tests/integration/test_monitoring_tools.py.)
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from edgefl.monitor import FleetState
from edgefl.monitor.exporter import FleetCollector
from edgefl.monitor.state import NODE_GAUGES
from edgefl.topics import Topics
from edgefl.wire import Status, encode_metrics, encode_status

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docs" / "grafana" / "edgefl.json"
T = Topics()
#: PromQL words that are not metric names.
PROMQL = {"sum", "by", "rate", "without", "avg", "max", "min", "count", "increase"}


def exporter_output(state: FleetState) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(state, threading.Lock()))  # type: ignore[arg-type]
    return str(generate_latest(registry).decode())


def full_fleet() -> FleetState:
    """A cloud, a gateway and a device that reported every figure the exporter knows."""
    state = FleetState()
    figures = dict.fromkeys(NODE_GAUGES, 1)
    for role, node, parent in (("cloud", "cloud", "cloud"), ("gateway", "gw-1", "cloud")):
        state.apply(
            T.status(parent, node),
            encode_status(Status(id=node, role=role, online=True, buffered=0)),
        )  # type: ignore[arg-type]
        state.apply(T.metrics(role, node), encode_metrics(role, node, {
            **figures, "rejected_stale": 1, "rejected_total": 1, "bytes_up": 10,
            "bytes_down": 20}))  # fmt: skip
    state.apply(T.status("gw-1", "dev-1"), encode_status(Status(
        id="dev-1", online=True, battery=0.5, buffered=1, model_version=3)))  # fmt: skip
    state.apply(T.metrics("device", "dev-1"), encode_metrics("device", "dev-1", {
        "round": 2, "bytes_up": 5, "bytes_down": 7}))  # fmt: skip
    return state


def served(text: str) -> tuple[set[str], set[str]]:
    """Metric names that have samples, and every label name, in exposition text."""
    names, labels = set(), set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"([a-z_]+)(?:\{([^}]*)\})? ", line)
            assert m, line
            names.add(m[1])
            labels |= set(re.findall(r"([a-z_]+)=", m[2] or ""))
    return names, labels


def expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_every_panel_reads_the_prometheus_data_source(doc: dict[str, Any]) -> None:
    (variable,) = doc["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    for panel in doc["panels"]:
        for item in (panel, *panel["targets"]):
            assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_expression_names_only_metrics_and_labels_the_exporter_serves() -> None:
    names, labels = served(exporter_output(full_fleet()))
    assert {"edgefl_bytes_up", "edgefl_device_bytes_up"} <= names  # the MQTT byte counters
    used_names: set[str] = set()
    for expr in expressions():
        bare = re.sub(r'"[^"]*"|\[[^\]]*\]', "", expr)  # no strings, no durations
        words = set(re.findall(r"[a-z_][a-z0-9_]*", bare))
        metrics = {w for w in words if w.startswith("edgefl_")}
        assert metrics, expr
        assert metrics <= names, f"{expr}: {sorted(metrics - names)}"
        grouped = {
            label.strip()
            for group in re.findall(r"\bby \(([^)]*)\)", expr)
            for label in group.split(",")
        }
        selected = set(re.findall(r"([a-z_]+)\s*=~?", expr))
        assert grouped | selected <= labels, f"{expr}: {sorted((grouped | selected) - labels)}"
        assert words - metrics - grouped - selected <= PROMQL, expr
        used_names |= metrics
    # The figures the dashboard is for are all there.
    assert {"edgefl_accuracy", "edgefl_participants", "edgefl_rejected_total",
            "edgefl_bytes_in", "edgefl_device_online"} <= used_names  # fmt: skip


def test_a_metric_the_exporter_does_not_serve_is_caught() -> None:
    names, _ = served(exporter_output(full_fleet()))
    assert "edgefl_accuracy_total" not in names and "edgefl_accuracy" in names
