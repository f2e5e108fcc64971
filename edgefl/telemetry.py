"""Status (retained, with a last will) and Metrics (JSON) publishing for every role.

Monitoring is plain MQTT: these payloads are what mosquitto_sub, Node-RED or
Grafana read. Publishing telemetry never raises into the caller's round logic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .topics import Topics
from .transport import LOST, AnyTransport, Will
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
