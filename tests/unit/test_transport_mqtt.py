"""The MQTT transport against a broker that misbehaves on purpose.

A fake broker in this process speaks just enough MQTT 3.1.1 to connect, and
then loses or delays acknowledgements as a test tells it to. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
from timeouts import within

from edgefl.config import MqttSettings
from edgefl.transport import NotConnected, PublishTimeout, Transport

GREETING = b"\x30\x0a\x00\x03t/xhello"  # QoS 0 PUBLISH of b"hello" on t/x


class FakeBroker:
    """One listener; ``subacks`` says, per SUBSCRIBE in order, how long to wait
    before acknowledging it (``None``: never). Each SUBACK is followed by ``GREETING``."""

    def __init__(
        self,
        subacks: list[float | None] | None = None,
        *,
        puback: bool = True,
        cut: bool = False,
        connack: bool = True,
    ) -> None:
        self.subacks = list(subacks or [])
        self.connack = connack  # False: accept the TCP connection, never answer CONNECT
        self.puback = puback
        self.cut = cut  # drop the connection on the first PUBLISH
        self.connections = 0
        self.subscribes = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[MqttSettings]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield MqttSettings(broker=f"127.0.0.1:{port}", reconnect_min_s=0.05)
        finally:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                if not self._answer(head, body, writer):
                    break
                await writer.drain()
        writer.close()

    def _answer(self, head: int, body: bytes, writer: asyncio.StreamWriter) -> bool:
        kind = head >> 4
        if kind == 1 and self.connack:  # CONNECT
            writer.write(b"\x20\x02\x00\x00")
        elif kind == 8:  # SUBSCRIBE (one filter)
            self.subscribes += 1
            delay = self.subacks.pop(0) if self.subacks else 0.0
            if delay is not None:
                ack = bytes([0x90, 3]) + body[:2] + b"\x01" + GREETING
                asyncio.get_running_loop().call_later(delay, writer.write, ack)
        elif kind == 3:  # PUBLISH
            if self.cut:
                return False
            if head & 0x06 and self.puback:
                topic_len = int.from_bytes(body[:2], "big")
                writer.write(b"\x40\x02" + body[2 + topic_len : 4 + topic_len])
        elif kind == 12:  # PINGREQ
            writer.write(b"\xd0\x00")
        elif kind == 14:  # DISCONNECT
            return False
        return True


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
        async with Transport(settings, client_id="c"):
            # The connect timeout, not the publish timeout, bounds the wait for a CONNACK.
            async with within(15):
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
