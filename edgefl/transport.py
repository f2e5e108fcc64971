"""One resilient MQTT session over aiomqtt: reconnects, LWT, QoS 1, chunking.

``async with Transport(settings, client_id) as t`` keeps a connection alive in
a task it owns, re-subscribes after every reconnect, and yields whole
(reassembled) messages from ``t.messages()``. It never decodes payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import MqttSettings
from .wire import Reason, Reassembler, UpdateRejected, is_chunk, split

log = logging.getLogger(__name__)

#: How long an MQTT 5 broker keeps a persistent session of a client that is away.
SESSION_EXPIRY_S = 7 * 24 * 3600


class NotConnected(ConnectionError):
    """The broker is not reachable right now; the caller keeps its data and retries."""


class PublishTimeout(TimeoutError):
    """The broker did not acknowledge a QoS 1 publish within the timeout."""


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


OnConnect = Callable[[], Awaitable[None]]


def chunk_topic(topic: str, index: int) -> str:
    """Where chunk ``index`` of a retained payload on ``topic`` is kept."""
    return f"{topic}/chunk/{index}"


def chunk_source(topic: str) -> str:
    """The topic a (retained) chunk belongs to."""
    head, sep, tail = topic.rpartition("/chunk/")
    return head if sep and tail.isdigit() else topic


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


class Transport:
    """A long-lived MQTT session that survives broker restarts and network loss."""

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
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.will = will
        #: Keep the broker session (subscriptions and queued QoS 1 messages) across
        #: disconnects and restarts of this client id: what arrives while we are away
        #: waits for us instead of being dropped.
        self.persistent = persistent
        self._on_connect = on_connect
        #: Called with each whole message as it is read, instead of queueing it for
        #: ``messages()``: no task switch per message. It must not block; what it
        #: raises is logged with its traceback and the session goes on.
        self._on_message = on_message
        self._subscriptions: dict[str, int] = {}
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()  # set when the current connection drops
        self._inbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=queue_size)
        self._inflight = asyncio.Semaphore(settings.max_inflight)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._retained_chunks: dict[str, int] = {}
        self.reassembler = Reassembler(
            max_payload_bytes=max_payload_bytes, timeout_s=reassembly_timeout_s
        )
        self.rejected: Counter[Reason] = Counter()
        self.connects = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.messages_out = 0
        #: messages dropped because a bounded inbox (``queue_size``) was full
        self.dropped = 0

    # --------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Transport:
        self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.client_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect cleanly (no LWT) and wait for the connection task."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for a live connection; ``TimeoutError`` if none by ``timeout``."""
        await asyncio.wait_for(self._connected.wait(), timeout)

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
            protocol=protocol,
            will=will,
            **self._session_options(),
            queue_type=_handoff(self._deliver),
            keepalive=s.keepalive_s,
            timeout=max(10.0, s.publish_timeout_s),
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

    async def _run(self) -> None:
        delay = self.settings.reconnect_min_s
        outage_logged = False
        while not self._closing:
            try:
                async with self._make_client() as client:
                    self._client = client
                    _no_delay(client)
                    # Messages reach _deliver from paho's callback from here on, even
                    # while we await the SUBACKs (a resumed persistent session sends its
                    # queued messages first).
                    for topic, qos in list(self._subscriptions.items()):
                        await client.subscribe(topic, qos)
                    self.connects += 1
                    self._lost = asyncio.Event()
                    self._connected.set()
                    if outage_logged:
                        log.info("%s: reconnected to %s", self.client_id, self.settings.broker)
                    outage_logged = False
                    delay = self.settings.reconnect_min_s
                    if self._on_connect is not None:
                        await self._on_connect()
                    await self._until_disconnected(client)
            except aiomqtt.MqttError as exc:
                self._connected.clear()
                self._client = None
                if self._closing:
                    return
                if not outage_logged:
                    log.warning(
                        "%s: broker %s unreachable (%s); retrying with backoff",
                        self.client_id,
                        self.settings.broker,
                        exc,
                    )
                    outage_logged = True
            finally:
                self._connected.clear()
                self._lost.set()
                self._client = None
            # Full jitter keeps a fleet from reconnecting in lockstep after an outage.
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self.settings.reconnect_max_s)

    @staticmethod
    async def _until_disconnected(client: aiomqtt.Client) -> None:
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
        if is_chunk(payload):
            try:
                whole = self.reassembler.feed(chunk_source(topic), bytes(payload))
            except UpdateRejected as exc:
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

    def _enqueue(self, message: Message) -> None:
        if self._on_message is not None:
            try:
                self._on_message(message)
            except Exception:
                # Raised into paho, it would pass for a broken connection and hide
                # the bug behind a reconnect: say what failed, keep the session.
                log.exception("%s: message handler failed on %s", self.client_id, message.topic)
            return
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("%s: inbox full; message on %s dropped", self.client_id, message.topic)

    # ------------------------------------------------------------ subscribing
    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._subscriptions[topic] = qos
        client = self._client
        if client is not None and self.connected:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.subscribe(topic, qos)

    async def messages(self) -> AsyncIterator[Message]:
        """Whole messages, across reconnects, until the transport closes."""
        while True:
            yield await self._inbox.get()

    def pending(self) -> int:
        return self._inbox.qsize()

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

        Raises ``NotConnected`` when offline and ``PublishTimeout`` when the
        broker does not acknowledge in time; the caller still owns the data.
        """
        parts = split(payload, self.settings.max_message_bytes)
        if len(parts) == 1:
            await self._publish_one(topic, payload, qos, retain, timeout)
            return
        if retain:
            await self._publish_retained_chunks(topic, parts, qos, timeout)
        else:
            await asyncio.gather(*(self._publish_one(topic, p, qos, False, timeout) for p in parts))

    async def _publish_retained_chunks(
        self, topic: str, parts: list[bytes], qos: int, timeout: float | None
    ) -> None:
        # A topic retains one message, so each chunk of a retained payload gets
        # its own sub-topic; leftovers of a longer earlier payload are cleared.
        await asyncio.gather(
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
            try:
                await self._until_lost(
                    client.publish(topic, payload, qos=qos, retain=retain, timeout=limit)
                )
            except aiomqtt.MqttCodeError as exc:
                if exc.rc == paho.MQTT_ERR_NO_CONN:
                    raise NotConnected(str(exc)) from None
                raise NotConnected(f"publish failed: {exc}") from None
            except aiomqtt.MqttError as exc:
                if "timed out" in str(exc).lower():
                    raise PublishTimeout(f"no PUBACK for {topic} within {limit}s") from None
                raise NotConnected(str(exc)) from None
            except asyncio.TimeoutError:  # aiomqtt lets asyncio's own timeout through
                raise PublishTimeout(f"no PUBACK for {topic} within {limit}s") from None
            self.bytes_out += len(payload)
            self.messages_out += 1

    async def _until_lost(self, publish: Coroutine[Any, Any, None]) -> None:
        """Await ``publish`` but fail fast if the connection drops meanwhile.

        paho keeps an unacknowledged publish until its timeout even after the
        socket is gone; the caller (an outbox) would rather retry on reconnect.
        """
        lost = self._lost
        task = asyncio.ensure_future(publish)
        watcher = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
            raise NotConnected("connection lost before the broker acknowledged")
        task.result()
