"""A fake MQTT 3.1.1 broker in the test's process, misbehaving on purpose.

It speaks just enough MQTT to connect, subscribe and publish, and loses or delays
acknowledgements as a test tells it to; for what a real broker cannot be made to do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from edgefl.config import MqttSettings

GREETING = b"\x30\x0a\x00\x03t/xhello"  # QoS 0 PUBLISH of b"hello" on t/x


class FakeBroker:
    """One listener; ``subacks`` says, per SUBSCRIBE in order, how long to wait
    before acknowledging it (``None``: never). Each SUBACK is followed by ``greeting``."""

    def __init__(
        self,
        subacks: list[float | None] | None = None,
        *,
        puback: bool = True,
        cut: bool = False,
        connack: bool = True,
        greeting: bytes = GREETING,
    ) -> None:
        self.greeting = greeting
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
        elif kind == 8:  # SUBSCRIBE: one granted QoS 1 per filter
            self.subscribes += 1
            delay = self.subacks.pop(0) if self.subacks else 0.0
            filters, i = 0, 2
            while i < len(body):
                i += 2 + int.from_bytes(body[i : i + 2], "big") + 1
                filters += 1
            if delay is not None:
                ack = bytes([0x90, 2 + filters]) + body[:2] + b"\x01" * filters + self.greeting
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
