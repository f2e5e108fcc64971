"""An in-process bus with the MQTT semantics edgefl relies on, for fast unit tests.

One ``MemoryBroker`` keeps retained messages and client sessions; each
``MemoryTransport`` is one client, used like ``Transport``: QoS 1 waits for a
persistent session that is away, wills fire when a link is lost, ``+``/``#``
filters. ``tests/integration/test_transport_semantics.py`` holds it to Mosquitto's
behaviour. No sockets, threads or chunking here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from paho.mqtt.client import topic_matches_sub

from ..supervise import wait_event
from .base import (
    AnyTransport,
    Message,
    NotConnected,
    PublishTimeout,
    TransportFactory,
    Will,
)
from .connection import Connection, OnConnect

log = logging.getLogger(__name__)


class _Session:
    """What the broker keeps for one client id, connected or not."""

    __slots__ = ("client", "persistent", "queued", "subscriptions")

    def __init__(self, persistent: bool) -> None:
        self.persistent = persistent
        self.subscriptions: dict[str, int] = {}
        self.queued: deque[Message] = deque()  # QoS 1 messages that came while away
        self.client: MemoryTransport | None = None

    def qos_for(self, topic: str) -> int | None:
        """The highest QoS of this session's filters that match ``topic``; None if none."""
        granted = [q for f, q in self.subscriptions.items() if topic_matches_sub(f, topic)]
        return max(granted) if granted else None


def _check_filter(topic: str) -> None:
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or (
            "+" in level and level != "+"
        ):
            raise ValueError(f"invalid topic filter {topic!r}")


class MemoryBroker:
    """The broker: retained messages, sessions keyed by client id, routing.

    ``drop(client_id)`` makes a client's link fail as a network loss would (its
    will fires, it reconnects); ``stop()``/``start()`` take the whole broker away
    and back (sessions and retained messages survive, no wills fire).
    """

    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, bytes] = {}
        self.online = True
        #: False: QoS 1 publishes get no PUBACK (and are not routed) until set again.
        self.acks = True

    @property
    def retained(self) -> dict[str, bytes]:
        """A copy of the retained payloads, by topic."""
        return dict(self._retained)

    def clients(self) -> list[str]:
        """Ids of the clients connected now."""
        return [cid for cid, s in self._sessions.items() if s.client is not None]

    def drop(self, client_id: str) -> None:
        """Cut a client's link without a DISCONNECT: its will fires, it reconnects."""
        session = self._sessions.get(client_id)
        if session is not None and session.client is not None:
            self._disconnect(session.client, clean=False)

    def stop(self) -> None:
        """The broker goes down: every link drops and connecting fails until ``start``."""
        self.online = False
        for session in list(self._sessions.values()):
            if session.client is not None:
                self._disconnect(session.client, clean=True)

    def start(self) -> None:
        self.online = True

    def factory(self) -> TransportFactory:
        """A transport factory for the shells (``Aggregator``, ``DeviceAgent``) on this bus."""

        def make(client_id: str, *, max_payload_bytes: int = 0, **options: Any) -> AnyTransport:
            return MemoryTransport(self, client_id, **options)

        return make

    # ------------------------------------------------ used by MemoryTransport
    def _connect(self, client: MemoryTransport) -> _Session:
        if not self.online:
            raise NotConnected("memory broker is down")
        session = self._sessions.get(client.client_id)
        if session is not None and session.client is not None:
            self._disconnect(session.client, clean=False)  # a newer connection takes over
            session = self._sessions.get(client.client_id)
        if session is None or not client.persistent or not session.persistent:
            session = _Session(client.persistent)
            self._sessions[client.client_id] = session
        session.client = client
        while session.queued and session.client is client:
            client._receive(session.queued.popleft())
        return session

    def _disconnect(self, client: MemoryTransport, *, clean: bool) -> None:
        session = self._sessions.get(client.client_id)
        if session is None or session.client is not client:
            return
        session.client = None
        if not session.persistent:
            del self._sessions[client.client_id]
        client._sever()
        will = client.will
        if not clean and will is not None:
            self._route(will.topic, will.payload, will.qos, will.retain)

    def _subscribe(self, session: _Session, topic: str, qos: int) -> None:
        _check_filter(topic)
        session.subscriptions[topic] = qos
        client = session.client
        if client is None:
            return
        for name, payload in list(self._retained.items()):
            if topic_matches_sub(topic, name):
                client._receive(Message(name, payload, retain=True, qos=qos))

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to a topic filter {topic!r}")
        if retain and payload:
            self._retained[topic] = payload
        elif retain:
            self._retained.pop(topic, None)
        for session in list(self._sessions.values()):
            granted = session.qos_for(topic)
            if granted is None:
                continue
            message = Message(topic, payload, retain=False, qos=min(qos, granted))
            if session.client is not None:
                session.client._receive(message)
            elif session.persistent and min(qos, granted) >= 1:
                session.queued.append(message)


class MemoryTransport(Connection):
    """One client of a ``MemoryBroker``; the same surface as ``Transport``."""

    outages = (NotConnected,)

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        will: Will | None = None,
        on_connect: OnConnect | None = None,
        queue_size: int = 0,
        persistent: bool = False,
        on_message: Callable[[Message], None] | None = None,
        publish_timeout_s: float = 30.0,
        reconnect_s: float = 0.01,
    ) -> None:
        super().__init__(
            client_id,
            will=will,
            persistent=persistent,
            on_connect=on_connect,
            on_message=on_message,
            queue_size=queue_size,
            reconnect_min_s=reconnect_s,
            reconnect_max_s=reconnect_s * 8,
            where="memory",
        )
        self.broker = broker
        self.publish_timeout_s = publish_timeout_s
        self._session: _Session | None = None
        self._lost = asyncio.Event()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[None]:
        self._lost = asyncio.Event()
        self._session = session = self.broker._connect(self)
        try:
            for topic, qos in list(self._subscriptions.items()):
                self.broker._subscribe(session, topic, qos)
            yield
        finally:
            self.broker._disconnect(self, clean=True)  # a no-op if the broker cut us
            self._session = None

    async def _until_lost(self) -> None:
        await self._lost.wait()

    def _sever(self) -> None:
        self._session = None
        if not self._closed:
            self._ready.clear()  # at once, as the broker sees it, not when the task wakes
        self._lost.set()

    def _receive(self, message: Message) -> None:
        self.bytes_in += len(message.payload)
        self._count(message.topic, len(message.payload), message.qos, sent=False)
        self._enqueue(message)

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._check_open()
        _check_filter(topic)
        self._subscriptions[topic] = qos
        if self._session is not None:
            self.broker._subscribe(self._session, topic, qos)
        await asyncio.sleep(0)

    async def unsubscribe(self, topic: str) -> None:
        """Forget ``topic`` now and in every later session."""
        self._check_open()
        self._subscriptions.pop(topic, None)
        if self._session is not None:
            self._session.subscriptions.pop(topic, None)
        await asyncio.sleep(0)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Route ``payload`` now; ``NotConnected``/``PublishTimeout`` as ``Transport`` raises."""
        self._check_open()
        if self._session is None or not self.connected:
            raise NotConnected(f"{self.client_id}: not connected to the memory broker")
        if qos > 0 and not self.broker.acks:
            limit = timeout if timeout is not None else self.publish_timeout_s
            if await wait_event(self._lost, limit):
                raise NotConnected("connection lost before the broker acknowledged")
            raise PublishTimeout(f"no PUBACK for {topic} within {limit}s")
        self.broker._route(topic, bytes(payload), qos, retain)
        self.bytes_out += len(payload)
        self._count(topic, len(payload), qos, sent=True)
        self.messages_out += 1
        await asyncio.sleep(0)  # a publish lets others run, as a socket write does
