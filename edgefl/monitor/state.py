"""The fleet as the monitor knows it, rebuilt from metrics and status messages alone.

Pure: no MQTT, no clock, no output. A malformed or foreign message changes nothing.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..telemetry import BYTE_FIELDS
from ..topics import TopicError, Topics

HISTORY = 60
#: Node metrics shown and exported as they come (name -> Prometheus help).
NODE_GAUGES = {
    "round": "last completed round",
    "version": "model version after the round",
    "participants": "updates folded into the last round",
    "selected": "children selected for the last round",
    "samples": "samples behind the last round's updates",
    "bytes_in": "update bytes received in the last round",
    "clipped": "deltas of the last round scaled down to the clip bound",
    "clip_bound": "the last round's clip bound (L2 norm)",
    "accuracy": "held-out accuracy (0..1)",
    "loss": "held-out loss",
    "round_ms": "wall time of the last round (ms)",
    "agg_ms": "time to average the last round and apply it (ms)",
    "children_known": "children that ever published a status",
    "children_online": "children whose retained status says online",
}
REJECTED_PREFIX = "rejected_"
#: The MQTT byte counters every role's records carry (cumulative, and grown this round).
BYTE_COUNTERS = (*BYTE_FIELDS, *(f"round_{name}" for name in BYTE_FIELDS), "metrics_bytes")


def _num(value: Any) -> float | None:
    """A finite number as it came (an int stays an int), or None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


@dataclass
class NodeView:
    """A gateway or the cloud: its last round's metrics and its status."""

    id: str
    role: str = "gateway"
    parent: str | None = None
    online: bool | None = None
    buffered: int | None = None  # sync updates waiting for the parent
    figures: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    #: (round, version, accuracy) of the last rounds that reported an accuracy
    history: deque[tuple[int, int, float]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    metrics_ts: float | None = None
    status_ts: float | None = None
    #: the monitor's clock when it last heard of the node (``apply``'s ``at``)
    seen: float | None = None

    @property
    def accuracy_history(self) -> list[float]:
        return [acc for _, _, acc in self.history]

    @property
    def accuracy_by_version(self) -> dict[int, float]:
        """The accuracy of each model version the node reported (the latest record wins)."""
        return {version: acc for _, version, acc in self.history}

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


@dataclass
class DeviceView:
    """A device: its retained status and its last round's metrics."""

    id: str
    gateway: str | None = None
    online: bool | None = None
    battery: float | None = None
    charging: bool | None = None
    link: str | None = None
    uplink_kbps: float | None = None
    buffered: int | None = None
    model_version: int | None = None
    eligible: bool | None = None
    reason: str = ""
    last_round: int | None = None
    loss: float | None = None
    rounds_trained: int | None = None
    bytes: dict[str, float] = field(default_factory=dict)  # BYTE_COUNTERS, as reported
    status_ts: float | None = None
    metrics_ts: float | None = None
    #: the monitor's clock when it last heard of the device (``apply``'s ``at``)
    seen: float | None = None


class FleetState:
    """Everything the monitor knows, rebuilt from messages only.

    ``apply`` never raises on a payload: a foreign topic or a malformed message
    is counted in ``ignored`` and changes nothing.
    """

    def __init__(self, prefix: str = "edgefl") -> None:
        self.topics = Topics(prefix)
        self.nodes: dict[str, NodeView] = {}
        self.devices: dict[str, DeviceView] = {}
        self.ignored = 0
        self.messages = 0
        self._at: float | None = None  # the message being applied arrived then

    def apply(self, topic: str, payload: bytes, at: float | None = None) -> bool:
        """Fold one message in, received at ``at`` on the caller's clock (what
        ``expire`` counts from); False if it was ignored."""
        self.messages += 1
        self._at = at
        try:
            parsed = self.topics.parse(topic)
        except TopicError:
            return self._ignore()
        if parsed.kind not in ("status", "metrics") or parsed.sender is None:
            return self._ignore()
        if not payload:  # a retained status cleared by its owner
            if parsed.kind == "status":
                self.devices.pop(parsed.sender, None)
            return True
        try:
            doc = json.loads(payload)
        except ValueError:
            return self._ignore()
        if not isinstance(doc, dict):
            return self._ignore()
        if parsed.kind == "status":
            self._status(parsed.node, parsed.sender, doc)
        else:
            self._metrics(parsed.node, parsed.sender, doc)
        return True

    def _ignore(self) -> bool:
        self.ignored += 1
        return False

    # ------------------------------------------------------------- status
    def _status(self, parent: str, sender: str, doc: dict[str, Any]) -> None:
        role = doc.get("role", "device")
        online = doc.get("online")
        online = online if isinstance(online, bool) else None
        if role in ("gateway", "cloud"):
            # Its parent is a node too, listed before its first metrics: the cloud
            # publishes no status of its own.
            self._parent_node(parent)
            node = self._node(sender, role)
            node.parent, node.online, node.status_ts = parent, online, _num(doc.get("ts"))
            if online is not False:
                node.buffered = _int(doc.get("buffered"))
            return
        dev = self._device(sender)
        dev.gateway, dev.online, dev.status_ts = parent, online, _num(doc.get("ts"))
        if online is False:
            return  # a last will carries no profile: keep the last one known
        dev.battery = _num(doc.get("battery"))
        charging = doc.get("charging")
        dev.charging = charging if isinstance(charging, bool) else None
        link = doc.get("link")
        dev.link = link if isinstance(link, str) else None
        dev.uplink_kbps = _num(doc.get("uplink_kbps"))
        dev.buffered = _int(doc.get("buffered"))
        dev.model_version = _int(doc.get("model_version"))
        eligible = doc.get("eligible")
        dev.eligible = eligible if isinstance(eligible, bool) else None
        reason = doc.get("reason")
        dev.reason = reason if isinstance(reason, str) else ""

    # ------------------------------------------------------------ metrics
    def _metrics(self, role: str, sender: str, doc: dict[str, Any]) -> None:
        if role == "device":
            self._device_metrics(self._device(sender), doc)
            return
        node = self._node(sender, role)
        node.metrics_ts = _num(doc.get("ts"))
        # Rejection counts are cumulative, so any record has the latest ones.
        for key, value in doc.items():
            count = _int(value)
            reason = key[len(REJECTED_PREFIX) :]
            if key.startswith(REJECTED_PREFIX) and reason != "total" and count is not None:
                node.rejected[reason] = count
        if doc.get("event", "round") != "round":
            return  # a re-announced round has closed nothing: keep the last round's figures
        for name, value in doc.items():
            number = _num(value)
            if number is not None and (name in NODE_GAUGES or name in BYTE_COUNTERS):
                node.figures[name] = number
        accuracy, round_ = _num(doc.get("accuracy")), _int(doc.get("round"))
        if accuracy is not None:
            if node.history and round_ is not None and node.history[-1][0] == round_:
                node.history.pop()  # the same round reported twice: keep the latest
            version = _int(doc.get("version"))
            node.history.append((-1 if round_ is None else round_,
                                 -1 if version is None else version, accuracy))  # fmt: skip

    @staticmethod
    def _device_metrics(dev: DeviceView, doc: dict[str, Any]) -> None:
        dev.metrics_ts = _num(doc.get("ts"))
        if doc.get("event", "round") == "round":
            dev.last_round = _int(doc.get("round"))
            dev.loss = _num(doc.get("loss"))
        for name in ("buffered", "rounds_trained"):
            value = _int(doc.get(name))
            if value is not None:
                setattr(dev, name, value)
        battery = _num(doc.get("battery"))
        if battery is not None:
            dev.battery = battery
        for name in BYTE_COUNTERS:
            count = _num(doc.get(name))
            if count is not None:
                dev.bytes[name] = count

    # ---------------------------------------------------------- accessors
    def _node(self, node_id: str, role: str) -> NodeView:
        node = self.nodes.get(node_id)
        if node is None:
            node = self.nodes[node_id] = NodeView(node_id, role)
        node.role = role
        node.seen = self._at
        return node

    def _parent_node(self, node_id: str) -> None:
        """A node named as a parent: the cloud unless its own messages say otherwise."""
        node = self.nodes.get(node_id)
        if node is None:
            self.nodes[node_id] = NodeView(node_id, "cloud", seen=self._at)

    def _device(self, device_id: str) -> DeviceView:
        dev = self.devices.get(device_id)
        if dev is None:
            dev = self.devices[device_id] = DeviceView(device_id)
        dev.seen = self._at
        return dev

    def expire(self, now: float, after_s: float) -> int:
        """Forget the nodes and devices offline and unheard of for ``after_s`` before
        ``now`` (0: never); how many went."""
        if after_s <= 0:
            return 0
        gone = 0
        for table in (self.nodes, self.devices):
            old = [
                key
                for key, view in table.items()
                if view.online is False and view.seen is not None and now - view.seen > after_s
            ]
            for key in old:
                del table[key]
            gone += len(old)
        return gone

    def sorted_nodes(self) -> list[NodeView]:
        """The cloud first, then gateways by id."""
        return sorted(self.nodes.values(), key=lambda n: (n.role != "cloud", n.id))

    def sorted_devices(self) -> list[DeviceView]:
        return sorted(self.devices.values(), key=lambda d: (d.gateway or "~", d.id))

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain JSON-able data (``--once --json``)."""
        return {
            "nodes": {
                n.id: {
                    "role": n.role,
                    "parent": n.parent,
                    "online": n.online,
                    "buffered": n.buffered,
                    **n.figures,
                    "rejected": dict(n.rejected),
                    "rejected_total": n.rejected_total,
                    "accuracy_history": n.accuracy_history,
                }
                for n in self.sorted_nodes()
            },
            "devices": {
                d.id: {k: v for k, v in vars(d).items() if k != "id"} for d in self.sorted_devices()
            },
            "messages": self.messages,
            "ignored": self.ignored,
        }
