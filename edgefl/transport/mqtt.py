"""One resilient MQTT session over aiomqtt: reconnects, LWT, QoS 1, chunking.

``async with Transport(settings, client_id) as t`` keeps a connection alive in
a task it owns, re-subscribes after every reconnect, and yields whole
(reassembled) messages from ``t.messages()``. It never decodes payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..config import MqttSettings
from ..supervise import all_completed, first_completed
from ..wire import Reason, Rejected
from .base import Message, NotConnected, PublishTimeout, Will
from .chunks import Reassembler, chunk_source, chunk_topic, is_chunk, split
from .connection import Connection, OnConnect

log = logging.getLogger(__name__)

#: How long an MQTT 5 broker keeps a persistent session of a client that is away.
SESSION_EXPIRY_S = 7 * 24 * 3600
#: SUBSCRIBEs sent for one topic on one connection before it is given up as broken.
SUBSCRIBE_TRIES = 3


class _NoSubAck(Exception):
    """The broker acknowledged none of our SUBSCRIBEs for a topic: reconnect."""


class _LateAck(logging.Filter):
    """aiomqtt logs an acknowledgement nobody waits for any more as an error with a
    ``KeyError`` traceback. After a bounded subscribe gave up and asked again
    (aiomqtt issue #356: a SUBACK can be lost, or come late), one is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Unexpected message ID"):
            return True
        log.debug("%s (an acknowledgement after its request was retried)", record.getMessage())
        return False


_AIOMQTT_LOG = logging.getLogger(f"{__name__}.aiomqtt")
_AIOMQTT_LOG.addFilter(_LateAck())


def _handoff(deliver: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue[aiomqtt.Message]]:
    """A queue class for aiomqtt that hands each message to ``deliver`` instead of storing it."""

    class Handoff(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            deliver(item)

    return Handoff


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    if settings.ca_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.ca_file))
    if settings.cert_file is not None:
        ctx.load_cert_chain(str(settings.cert_file), settings.key_file and str(settings.key_file))
    if settings.tls_insecure:
        ctx.check_hostname = False
    return ctx


def _no_delay(client: aiomqtt.Client) -> None:
    """Turn Nagle's algorithm off on the client's socket.

    QoS 1 is request and response: with Nagle on, a publish written right after
    another waits for the (delayed) TCP ACK of the first, which stalls PUBACKs by
    tens of milliseconds. aiomqtt does not expose the socket, so this reaches paho's.
    """
    paho_client = getattr(client, "_client", None)
    sock = paho_client.socket() if paho_client is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Transport(Connection):
    """A long-lived MQTT session that survives broker restarts and network loss."""

    outages = (aiomqtt.MqttError, _NoSubAck, NotConnected)

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        will: Will | None = None,
        on_connect: OnConnect | None = None,
        reassembly_timeout_s: float = 120.0,
        max_payload_bytes: int = 64 * 1024 * 1024,
        queue_size: int = 0,
        persistent: bool = False,
        on_message: Callable[[Message], None] | None = None,
        subscribe_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(
            client_id,
            will=will,
            persistent=persistent,
            on_connect=on_connect,
            on_message=on_message,
            queue_size=queue_size,
            reconnect_min_s=settings.reconnect_min_s,
            reconnect_max_s=settings.reconnect_max_s,
            where=settings.broker,
        )
        self.settings = settings
        self.subscribe_timeout_s = subscribe_timeout_s
        self._client: aiomqtt.Client | None = None
        self._lost = asyncio.Event()  # set when the current connection drops
        self._restart = asyncio.Event()  # set to drop a connection that is not usable
        self._inflight = asyncio.Semaphore(settings.max_inflight)
        self._retained_chunks: dict[str, int] = {}
        self._v5 = settings.protocol == "5"
        self.reassembler = Reassembler(
            max_payload_bytes=max_payload_bytes, timeout_s=reassembly_timeout_s
        )

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        will = None
        if self.will is not None:
            w = self.will
            will = aiomqtt.Will(w.topic, w.payload, qos=w.qos, retain=w.retain)
        protocol = aiomqtt.ProtocolVersion.V5 if s.protocol == "5" else aiomqtt.ProtocolVersion.V311
        return aiomqtt.Client(
            s.host,
            s.port,
            identifier=self.client_id,
            username=s.username,
            password=s.password,
            logger=_AIOMQTT_LOG,
            protocol=protocol,
            will=will,
            **self._session_options(),
            queue_type=_handoff(self._deliver),
            keepalive=s.keepalive_s,
            timeout=s.connect_timeout_s,  # publishes and subscribes bound their own waits
            max_inflight_messages=s.max_inflight,
            tls_context=tls_context(s),
            tls_insecure=s.tls_insecure if s.ca_file else None,
        )

    def _session_options(self) -> dict[str, Any]:
        if self.settings.protocol != "5":
            return {"clean_session": not self.persistent}
        if not self.persistent:
            return {"clean_session": None}
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        return {"clean_session": None, "clean_start": False, "properties": props}

    # ------------------------------------------------------- connection loop
    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[None]:
        async with self._make_client() as client:
            self._client = client
            self._lost = asyncio.Event()
            self._restart = asyncio.Event()
            _no_delay(client)
            try:
                # Messages reach _deliver from paho's callback from here on, even
                # while we await the SUBACKs (a resumed persistent session sends its
                # queued messages first).
                for topic, qos in list(self._subscriptions.items()):
                    await self._subscribe_on(client, topic, qos)
                yield
            finally:
                self._client = None
                self._lost.set()

    async def _until_lost(self) -> None:
        client = self._client
        assert client is not None
        await first_completed(self._read(client), self._restart.wait())

    @staticmethod
    async def _read(client: aiomqtt.Client) -> None:
        """Return (raising ``MqttError``) when the connection is lost.

        No message reaches this iterator: the hand-off queue gives each one to
        ``_deliver`` as paho parses it. aiomqtt's iterator spends a task and several
        loop turns per message while paho reads one per turn, so on a busy
        subscription its queue grew by most of what arrived (memory in proportion
        to the backlog instead of to one message).
        """
        async for _ in client.messages:
            pass

    def _deliver(self, msg: aiomqtt.Message) -> None:
        payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
        topic = msg.topic.value
        self.bytes_in += len(payload)
        self._count(topic, len(payload), msg.qos, sent=False, v5=self._v5)
        if is_chunk(payload):
            try:
                whole = self.reassembler.feed(chunk_source(topic), bytes(payload))
            except Rejected as exc:
                self.rejected[exc.reason] += 1
                log.debug("%s: chunk on %s rejected: %s", self.client_id, topic, exc)
                return
            finally:
                if self.reassembler.expired:
                    self.rejected[Reason.CHUNK_TIMEOUT] += self.reassembler.expired
                    self.reassembler.expired = 0
            if whole is None:
                return
            self._enqueue(Message(chunk_source(topic), whole, bool(msg.retain)))
            return
        self._enqueue(Message(topic, bytes(payload), bool(msg.retain)))

    # ------------------------------------------------------------ subscribing
    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._check_open()
        self._subscriptions[topic] = qos
        client = self._client
        if client is None or not self.connected:
            return
        try:
            await self._subscribe_on(client, topic, qos)
        except (aiomqtt.MqttError, NotConnected):
            pass  # the connection is going; the next one subscribes
        except _NoSubAck as exc:
            log.warning("%s: %s; reconnecting", self.client_id, exc)
            self._restart.set()

    async def unsubscribe(self, topic: str) -> None:
        """Forget ``topic`` now if connected, and in every later session."""
        self._check_open()
        self._subscriptions.pop(topic, None)
        client = self._client
        if client is None or not self.connected:
            return  # a persistent session keeps it at the broker: the next connect says so
        with contextlib.suppress(aiomqtt.MqttError, NotConnected):
            await self._acknowledged(
                client.unsubscribe(topic, timeout=math.inf), self.subscribe_timeout_s
            )

    async def _subscribe_on(self, client: aiomqtt.Client, topic: str, qos: int) -> None:
        """SUBSCRIBE and wait, bounded, for the SUBACK; ask again when none comes.

        aiomqtt 2.x can miss a SUBACK (its issue #356) and then waits for it until
        its own timeout, or forever. SUBSCRIBE is idempotent, so asking again is safe.
        """
        for _ in range(SUBSCRIBE_TRIES):
            request = client.subscribe(topic, qos, timeout=math.inf)
            if await self._acknowledged(request, self.subscribe_timeout_s):
                return
            log.debug("%s: no SUBACK for %s; subscribing again", self.client_id, topic)
        raise _NoSubAck(f"no SUBACK for {topic} after {SUBSCRIBE_TRIES} tries")

    # ------------------------------------------------------------- publishing
    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK of every part.

        Raises ``NotConnected`` when offline (``TransportClosed`` once closed) and
        ``PublishTimeout`` when the broker does not acknowledge in time; the caller
        still owns the data.
        """
        self._check_open()
        parts = split(payload, self.settings.max_message_bytes)
        if len(parts) == 1:
            await self._publish_one(topic, payload, qos, retain, timeout)
            return
        if retain:
            await self._publish_retained_chunks(topic, parts, qos, timeout)
        else:
            await all_completed(*(self._publish_one(topic, p, qos, False, timeout) for p in parts))

    async def _publish_retained_chunks(
        self, topic: str, parts: list[bytes], qos: int, timeout: float | None
    ) -> None:
        # A topic retains one message, so each chunk of a retained payload gets
        # its own sub-topic; leftovers of a longer earlier payload are cleared.
        await all_completed(
            *(
                self._publish_one(chunk_topic(topic, i), p, qos, True, timeout)
                for i, p in enumerate(parts)
            )
        )
        previous = self._retained_chunks.get(topic, 0)
        for i in range(len(parts), previous):
            await self._publish_one(chunk_topic(topic, i), b"", qos, True, timeout)
        self._retained_chunks[topic] = len(parts)

    async def _publish_one(
        self, topic: str, payload: bytes, qos: int, retain: bool, timeout: float | None
    ) -> None:
        async with self._inflight:
            client = self._client
            if client is None or not self.connected:
                raise NotConnected(f"not connected to {self.settings.broker}")
            limit = timeout if timeout is not None else self.settings.publish_timeout_s
            request = client.publish(topic, payload, qos=qos, retain=retain, timeout=math.inf)
            try:
                acknowledged = await self._acknowledged(request, limit)
            except aiomqtt.MqttError as exc:
                raise NotConnected(f"publish to {topic} failed: {exc}") from None
            if not acknowledged:
                raise PublishTimeout(f"no PUBACK for {topic} within {limit}s")
            self.bytes_out += len(payload)
            self._count(topic, len(payload), qos, sent=True, v5=self._v5)
            self.messages_out += 1

    async def _acknowledged(self, request: Coroutine[Any, Any, object], timeout: float) -> bool:
        """Await ``request`` at most ``timeout`` seconds: True once it is done (its
        ``MqttError``, if any, raised), False when time ran out; ``NotConnected`` if
        the connection drops first.

        paho keeps an unacknowledged request until its timeout even after the socket
        is gone; the caller (an outbox) would rather retry on reconnect. aiomqtt's own
        timeout is a plain ``MqttError``, so it is off and the bound is kept here.
        """
        lost = self._lost
        task = asyncio.ensure_future(request)
        watcher = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait(
                {task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if not task.cancelled():
            task.result()
            return True
        if lost.is_set():
            raise NotConnected("connection lost before the broker acknowledged")
        return False
