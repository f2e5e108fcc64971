"""A device's MQTT sessions: the link it holds while online, and one session's life.

Owned by the agent's ``run`` (``link`` runs beside its round loop, heartbeat and
flusher); every message read goes to the agent, which never waits on it here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..supervise import bounded, first_completed
from ..telemetry import Telemetry, last_will
from ..transport import LOST, Transport

if TYPE_CHECKING:
    from .agent import DeviceAgent

#: How long a clean stop waits to publish ``online: false``.
GOODBYE_TIMEOUT_S = 2.0
#: How often an injected ``online()`` is asked while the agent waits for it to change.
LINK_POLL_S = 0.25


async def link(agent: DeviceAgent) -> None:
    """The agent's MQTT sessions: one for good, or one per spell of ``online``."""
    online = agent._online
    if online is None:
        await session(agent)
        return
    while True:
        await _until(online, True)
        await first_completed(session(agent), _until(online, False))


async def session(agent: DeviceAgent) -> None:
    """One MQTT session: subscribe to what the round needs, read until it ends, and say
    goodbye (or, for a simulated link loss, publish the will the broker would have)."""
    s = agent.settings
    will = last_will(agent.topics, s.gateway, agent.id, "device")
    make = agent._transport or functools.partial(Transport, s.mqtt)
    transport = make(agent.id, will=will, on_connect=agent._on_connect)
    transport.meter = agent.meter
    agent.feed.subscribed = set()
    await agent.feed.refresh(transport, None)
    telemetry = Telemetry(
        transport,
        agent.topics,
        role="device",
        sender=agent.id,
        parent=s.gateway,
        metrics=s.metrics,
    )
    async with transport:
        agent.transport, agent.telemetry = transport, telemetry
        try:
            async for message in transport.messages():
                agent._on_message(message)
                await agent.fetch()
        finally:
            agent.transport = None
            if agent._online is None or agent._online():  # a stop, not a lost link
                with contextlib.suppress(*LOST):
                    await bounded(telemetry.offline(), GOODBYE_TIMEOUT_S)
            else:
                # A simulated link loss ends the session cleanly, so the broker
                # would not fire our will: publish it as the broker would have.
                with contextlib.suppress(*LOST):
                    await bounded(
                        transport.publish(will.topic, will.payload, retain=True),
                        GOODBYE_TIMEOUT_S,
                    )


async def _until(online: Callable[[], bool], wanted: bool) -> None:
    while online() != wanted:
        await asyncio.sleep(LINK_POLL_S)
