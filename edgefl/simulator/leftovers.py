"""What a simulation leaves on a broker it did not start: its retained messages, cleared.

Statuses, models (whole or in chunks), announcements and deltas of the run's own
nodes are retained; a later fleet on the same broker would read them. Only the
run's node ids are touched, never another fleet's topics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection

from ..config import MqttSettings
from ..supervise import bounded
from ..topics import TopicError, Topics
from ..transport import Message, Transport

log = logging.getLogger(__name__)

#: The retained messages come right after the subscription; this long without one ends it.
QUIET_S = 0.5
#: The most time a clean-up may take, whatever the broker holds.
LIMIT_S = 20.0
_CHUNK = re.compile(r"/chunk/\d+$")


def owned(topics: Topics, topic: str, nodes: Collection[str]) -> bool:
    """Whether ``topic`` is one of the run's: its node is one of ``nodes``. Pure."""
    try:
        parsed = topics.parse(_CHUNK.sub("", topic))
    except TopicError:
        return False
    return parsed.kind != "metrics" and parsed.node in nodes


async def clear_retained(
    broker: str, nodes: Collection[str], prefix: str = "edgefl", client_id: str = "edgefl-sim"
) -> int:
    """Clear every retained message of ``nodes`` on ``broker``; how many were cleared."""
    topics = Topics(prefix)
    found: list[str] = []
    transport = Transport(MqttSettings(broker=broker, prefix=prefix), f"{client_id}-cleanup")
    await transport.subscribe(f"{prefix}/#", qos=1)
    async with transport:
        await transport.wait_connected(LIMIT_S)
        await bounded(_collect(transport, topics, nodes, found), LIMIT_S)
        for topic in found:
            await transport.publish(topic, b"", retain=True)
    log.info("cleared %d retained messages of the run on %s", len(found), broker)
    return len(found)


async def _collect(
    transport: Transport, topics: Topics, nodes: Collection[str], found: list[str]
) -> None:
    messages = transport.messages().__aiter__()
    taken: list[Message | None] = []

    async def take() -> None:
        taken.append(await anext(messages, None))

    while await bounded(take(), QUIET_S):  # until the broker has been quiet that long
        message = taken.pop()
        if message is None:
            return
        if message.retain and message.payload and owned(topics, message.topic, nodes):
            found.append(message.topic)
