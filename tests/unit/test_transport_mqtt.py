"""The MQTT transport against a broker that misbehaves on purpose.

A fake broker in this process speaks just enough MQTT 3.1.1 to connect, and
then loses or delays acknowledgements as a test tells it to. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from fake_broker import FakeBroker
from timeouts import within

from edgefl.transport import NotConnected, PublishTimeout, Transport


async def _first(transport: Transport) -> bytes:
    async with within(5):
        async for message in transport.messages():
            return message.payload
    raise AssertionError("messages() ended")


async def test_a_broker_that_never_answers_connect_is_dialled_again_after_the_connect_timeout() -> (
    None
):
    broker = FakeBroker(connack=False)
    async with broker.running() as settings:
        settings = settings.model_copy(update={"connect_timeout_s": 0.2, "publish_timeout_s": 60})
        # The connect timeout, not the publish timeout, bounds the wait for a CONNACK.
        async with Transport(settings, client_id="c"), within(15):
            while broker.connections < 3:
                await asyncio.sleep(0.02)
    assert broker.connections >= 3


async def test_a_subscribe_the_broker_never_acknowledges_is_sent_again() -> None:
    fake = FakeBroker([None])
    async with fake.running() as settings:
        transport = Transport(settings, "c", subscribe_timeout_s=0.2)
        await transport.subscribe("t/#")
        async with transport:
            await transport.wait_connected(3)
            assert await _first(transport) == b"hello"
    assert (fake.connections, fake.subscribes) == (1, 2)


async def test_a_late_suback_is_expected_and_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeBroker([0.5])
    caplog.set_level(logging.DEBUG)
    async with fake.running() as settings:
        transport = Transport(settings, "c", subscribe_timeout_s=0.2)
        await transport.subscribe("t/#")
        async with transport:
            await transport.wait_connected(3)
            assert await _first(transport) == b"hello"
            await asyncio.sleep(0.5)  # the late SUBACK of the first try arrives
    assert fake.subscribes == 2
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == [], caplog.text
    assert "Unexpected message ID" in caplog.text  # said, at DEBUG


async def test_a_subscribe_that_is_never_acknowledged_while_connected_reconnects() -> None:
    fake = FakeBroker([None, None, None])
    async with (
        fake.running() as settings,
        Transport(settings, "c", subscribe_timeout_s=0.1) as transport,
    ):
        await transport.wait_connected(3)
        await transport.subscribe("t/#")
        assert await _first(transport) == b"hello"  # sent once the new SUBSCRIBE is acked
        await transport.wait_connected(3)
        assert transport.connects == 2
    assert fake.subscribes == 4


async def test_a_missing_puback_is_a_publish_timeout() -> None:
    async with (
        FakeBroker(puback=False).running() as settings,
        Transport(settings, "c") as transport,
    ):
        await transport.wait_connected(3)
        await transport.publish("t/x", b"q0", qos=0)
        async with within(2):
            with pytest.raises(PublishTimeout):
                await transport.publish("t/x", b"q1", qos=1, timeout=0.2)
        assert transport.connected


async def test_a_connection_lost_during_a_publish_is_not_connected() -> None:
    async with FakeBroker(cut=True).running() as settings, Transport(settings, "c") as transport:
        await transport.wait_connected(3)
        async with within(5):
            with pytest.raises(NotConnected):
                await transport.publish("t/x", b"q1", qos=1, timeout=30)
