"""Prometheus gauges of a FleetState, read at scrape time from a custom registry.

Serves on loopback only; prometheus_client is imported when the exporter starts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from .state import BYTE_COUNTERS, NODE_GAUGES, DeviceView, FleetState, NodeView


class FleetCollector:
    """Prometheus collector that reads ``state`` at scrape time, under ``lock``."""

    def __init__(self, state: FleetState, lock: threading.Lock) -> None:
        self.state = state
        self.lock = lock

    def collect(self) -> Iterator[Any]:
        with self.lock:
            nodes = self.state.sorted_nodes()
            devices = self.state.sorted_devices()
            yield from self._node_families(nodes)
            yield from self._device_families(devices)

    @staticmethod
    def _node_families(nodes: list[NodeView]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["node", "role"]
        figures = {
            name: GaugeMetricFamily(f"edgefl_{name}", help_, labels=labels)
            for name, help_ in NODE_GAUGES.items()
        }
        online = GaugeMetricFamily(
            "edgefl_node_online", "1 if the node's retained status says online", labels=labels
        )
        buffered = GaugeMetricFamily(
            "edgefl_node_buffered", "sync updates waiting for the parent", labels=labels
        )
        # The nodes report cumulative counts since they started: a counter.
        rejected = CounterMetricFamily(
            "edgefl_rejected", "updates rejected, by reason", labels=[*labels, "reason"]
        )
        for n in nodes:
            values = [n.id, n.role]
            for name, value in n.figures.items():
                if name not in figures:  # one of the MQTT byte counters
                    help_ = f"{name} the node reported"
                    figures[name] = GaugeMetricFamily(f"edgefl_{name}", help_, labels=labels)
                figures[name].add_metric(values, value)
            if n.online is not None:
                online.add_metric(values, float(n.online))
            if n.buffered is not None:
                buffered.add_metric(values, n.buffered)
            for reason, count in sorted(n.rejected.items()):
                rejected.add_metric([*values, reason], count)
        yield from figures.values()
        yield from (online, buffered, rejected)

    @staticmethod
    def _device_families(devices: list[DeviceView]) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        specs = {
            "online": "1 if the device's retained status says online",
            "battery": "battery level (0..1)",
            "buffered": "updates waiting in the device's outbox",
            "model_version": "model version the device holds",
            "last_round": "last round the device trained",
        }
        families = {
            name: GaugeMetricFamily(f"edgefl_device_{name}", help_, labels=["device", "gateway"])
            for name, help_ in specs.items()
        }
        counters = {
            name: GaugeMetricFamily(f"edgefl_device_{name}", f"{name} the device reported",
                                    labels=["device", "gateway"])
            for name in BYTE_COUNTERS
        }  # fmt: skip
        for d in devices:
            labels = [d.id, d.gateway or ""]
            for name, family in families.items():
                value = getattr(d, name)
                if value is not None:
                    family.add_metric(labels, float(value))
            for name, value in d.bytes.items():
                counters[name].add_metric(labels, value)
        yield from families.values()
        yield from counters.values()


def serve_prometheus(state: FleetState, lock: threading.Lock, port: int) -> Any:
    """Serve ``state`` on http://127.0.0.1:PORT/metrics; returns the server (``shutdown()``)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(state, lock))
    server = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server[0] if isinstance(server, tuple) else server
