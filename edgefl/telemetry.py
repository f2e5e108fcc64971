"""Status (retained, with a last will) and Metrics (JSON) publishing for every role.

Monitoring is plain MQTT: these payloads are what mosquitto_sub, Node-RED or
Grafana read. Publishing telemetry never raises into the caller's round logic.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

from .topics import TopicError, Topics
from .transport import LOST, AnyTransport, Will, chunk_source
from .wire import MetricValue, Status, encode_metrics, encode_status

log = logging.getLogger(__name__)


def last_will(topics: Topics, parent: str, sender: str, role: str) -> Will:
    """The retained ``online: false`` Status the broker publishes if we vanish."""
    status = Status(online=False, role=role, id=sender)
    return Will(topics.status(parent, sender), encode_status(status), retain=True, qos=1)


class Telemetry:
    """Publishes one node's Status to its parent and its Metrics to monitors."""

    def __init__(
        self,
        transport: AnyTransport,
        topics: Topics,
        *,
        role: str,
        sender: str,
        parent: str | None,
        metrics: bool = True,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.role = role
        self.sender = sender
        self.parent = parent
        self.enabled = metrics

    async def status(self, status: Status) -> bool:
        """Publish ``status`` retained to the parent; False if it could not go out now."""
        if self.parent is None:
            return False
        try:
            await self.transport.publish(
                self.topics.status(self.parent, self.sender), encode_status(status), retain=True
            )
        except LOST as exc:
            log.debug("%s: status not sent: %s", self.sender, exc)
            return False
        return True

    async def offline(self) -> None:
        """Say goodbye on a clean shutdown (the will only fires on a lost connection)."""
        status = Status(online=False, role=self.role, id=self.sender)
        await self.status(status)

    async def metrics(self, fields: Mapping[str, MetricValue]) -> bool:
        """Publish one metrics record (QoS 0, not retained); False if offline."""
        if not self.enabled:
            return False
        payload = encode_metrics(self.role, self.sender, fields)
        try:
            await self.transport.publish(
                self.topics.metrics(self.role, self.sender), payload, qos=0
            )
        except LOST as exc:
            log.debug("%s: metrics not sent: %s", self.sender, exc)
            return False
        return True


#: The byte counters every metrics record carries: cumulative since the role started.
BYTE_FIELDS = ("bytes_up", "bytes_down", "children_bytes_up", "children_bytes_down")


class ByteMeter:
    """A role's MQTT bytes (whole PUBLISH packets), by link and direction.

    ``bytes_up``/``bytes_down``: on the link to its parent, what it sent (updates,
    statuses) and received (announcements, deltas, models). ``children_bytes_*``: a
    node's own view of the link to its children (what it received from them, what it
    published to them once; the broker fans it out). Metrics records go to
    ``metrics_bytes``. Set as a transport's ``meter``.
    """

    def __init__(self, topics: Topics, me: str) -> None:
        self.topics = topics
        self.me = me
        self.totals: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()

    def __call__(self, topic: str, size: int, sent: bool) -> None:
        try:
            parsed = self.topics.parse(chunk_source(topic))
        except TopicError:
            return
        if parsed.kind == "metrics":
            self.totals["metrics_bytes"] += size * sent
            return
        mine = parsed.node == self.me
        if parsed.kind in ("round", "delta", "model"):
            self.totals["children_bytes_down" if mine else "bytes_down"] += size
        elif mine or parsed.sender == self.me:
            self.totals["children_bytes_up" if mine else "bytes_up"] += size

    def fields(self, *, parent: bool, children: bool) -> dict[str, int]:
        """The cumulative counters, and as ``round_*`` what they grew since the last call."""
        names = [
            n
            for n in BYTE_FIELDS
            if (n.startswith("children") and children) or (not n.startswith("children") and parent)
        ]
        out = {n: self.totals[n] for n in names}
        out.update({f"round_{n}": self.totals[n] - self._reported[n] for n in names})
        out["metrics_bytes"] = self.totals["metrics_bytes"]
        self._reported = Counter(self.totals)
        return out
