"""A 1M-parameter update crosses a real Mosquitto bit-exact, whole or in chunks."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from timeouts import within

from edgefl import codecs, wire
from edgefl.broker import RunningBroker
from edgefl.config import MqttSettings
from edgefl.topics import Topics
from edgefl.transport import NotConnected, Transport

pytestmark = pytest.mark.integration
SPEC = {"w": (1000, 1000)}


def _encoded_update() -> bytes:
    delta = {"w": np.random.default_rng(0).normal(size=SPEC["w"]).astype(np.float32)}
    update = wire.Update(
        sender="dev-1", seq=1, round=0, base=0, n=10, tensors=codecs.encode_params(delta)
    )
    return wire.encode_update(update)


async def _send_and_receive(broker: RunningBroker, max_message_bytes: int) -> tuple[bytes, int]:
    settings = MqttSettings(broker=broker.url, max_message_bytes=max_message_bytes)
    topic = Topics().update("gw-1", "dev-1")
    payload = _encoded_update()
    async with Transport(settings, "rx") as rx, Transport(settings, "tx") as tx:
        await rx.wait_connected(10)
        await tx.wait_connected(10)
        await rx.subscribe(Topics().updates_of("gw-1"))
        await asyncio.sleep(0.2)  # SUBACK settles before the first publish
        async with within(30):
            await tx.publish(topic, payload)
            message = await anext(rx.messages())
    assert message.topic == topic
    return message.payload, tx.messages_out


async def test_one_million_parameter_update_arrives_bit_exact(broker: RunningBroker) -> None:
    received, messages = await _send_and_receive(broker, 8 * 1024 * 1024)
    assert received == _encoded_update()
    assert messages == 1
    update = wire.decode_update(received, SPEC)
    assert update.n == 10 and len(update.tensors[0].q) == 1_000_000


async def test_update_crosses_a_small_packet_broker_only_in_chunks(
    small_broker: RunningBroker,
) -> None:
    received, messages = await _send_and_receive(small_broker, 120 * 1024)
    assert received == _encoded_update()
    assert messages == -(-len(received) // (120 * 1024 - 200))  # ceil(size / part size)
    assert messages > 1


async def test_a_whole_payload_over_the_broker_limit_is_refused(
    small_broker: RunningBroker,
) -> None:
    # Sending it unchunked proves the broker really enforces the limit.
    settings = MqttSettings(broker=small_broker.url, max_message_bytes=8 * 1024 * 1024)
    async with Transport(settings, "tx") as tx:
        await tx.wait_connected(10)
        with pytest.raises(NotConnected):
            async with within(20):
                await tx.publish("edgefl/gw-1/update/dev-1", _encoded_update(), timeout=5)
