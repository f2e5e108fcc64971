"""What every transport backend shares: the reconnect loop, the connection state, the inbox.

A backend says how one connection is made and how it ends (``_connection``,
``_until_lost``); ``Connection`` owns the task that keeps making them, with back-off,
and logs whatever ends one. It never talks to a broker itself.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from ..supervise import wait_event
from ..wire import Reason
from .base import Message, TransportClosed, Will, publish_size

log = logging.getLogger(__name__)

OnConnect = Callable[[], Awaitable[None]]
_L = TypeVar("_L", bound="Connection")


class Inbox:
    """Whole messages waiting for ``messages()``; once closed, iterators drain it and end."""

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize
        self._items: deque[Message] = deque()
        self._wake = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, message: Message) -> bool:
        """Queue ``message``; False if the inbox is bounded and full, or closed."""
        if self.closed or (self.maxsize and len(self._items) >= self.maxsize):
            return False
        self._items.append(message)
        self._wake.set()
        return True

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def drain(self) -> AsyncIterator[Message]:
        while True:
            while self._items:
                yield self._items.popleft()
            if self.closed:
                return
            self._wake.clear()
            await self._wake.wait()


class Connection(abc.ABC):
    """One client's session with a broker, kept alive by a task this object owns."""

    #: exceptions that mean "the broker cannot be reached" (logged once per outage);
    #: anything else that ends a connection is a bug, logged with its traceback.
    outages: tuple[type[BaseException], ...] = ()

    def __init__(
        self,
        client_id: str,
        *,
        will: Will | None,
        persistent: bool,
        on_connect: OnConnect | None,
        on_message: Callable[[Message], None] | None,
        queue_size: int,
        reconnect_min_s: float,
        reconnect_max_s: float,
        where: str,
    ) -> None:
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
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self._where = where  # the broker, for log lines
        self._subscriptions: dict[str, int] = {}
        self._inbox = Inbox(queue_size)
        # Set while connected, and for good once closed, so that waiters wake up.
        self._ready = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.rejected: Counter[Reason] = Counter()
        self.connects = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.messages_out = 0
        #: whole PUBLISH packets, header, topic and properties included (``publish_size``)
        self.wire_out = 0
        self.wire_in = 0
        #: called with ``(topic, packet bytes, sent)`` for every PUBLISH (``telemetry.ByteMeter``)
        self.meter: Callable[[str, int, bool], None] | None = None
        #: messages dropped because a bounded inbox (``queue_size``) was full
        self.dropped = 0

    # --------------------------------------------------------------- lifecycle
    async def __aenter__(self: _L) -> _L:
        self._check_open()
        if self._task is not None:
            raise RuntimeError(f"{self.client_id}: transport entered twice")
        self._task = asyncio.create_task(self._run(), name=f"link-{self.client_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect cleanly (no will), stop reconnecting and end ``messages()``."""
        self._closed = True
        self._inbox.close()
        self._ready.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and not self._closed

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for a live connection; ``asyncio.TimeoutError`` if none by ``timeout``.

        A closed transport never connects. A bounded wait says so with its
        ``TimeoutError`` at once (its caller handles that one already); an unbounded
        one raises ``TransportClosed`` instead of waiting forever.
        """
        if timeout is None:
            self._check_open()
            await self._ready.wait()
            self._check_open()
        elif self._closed or not await wait_event(self._ready, timeout) or self._closed:
            raise asyncio.TimeoutError(f"{self.client_id}: not connected within {timeout}s")

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"{self.client_id}: transport closed")

    # ------------------------------------------------------- connection loop
    @abc.abstractmethod
    def _connection(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Connect and subscribe; the context is one connection's life."""

    @abc.abstractmethod
    async def _until_lost(self) -> None:
        """Return (or raise) when the current connection ends."""

    async def _run(self) -> None:
        delay = self.reconnect_min_s
        outage = False
        while not self._closed:
            try:
                async with self._connection():
                    self.connects += 1
                    self._ready.set()
                    if outage:
                        log.info("%s: reconnected to %s", self.client_id, self._where)
                    outage = False
                    delay = self.reconnect_min_s
                    if self._on_connect is not None:
                        await self._on_connect()
                    await self._until_lost()
            except self.outages as exc:
                if not outage and not self._closed:
                    log.warning(
                        "%s: broker %s unreachable (%s); retrying with backoff",
                        self.client_id,
                        self._where,
                        exc,
                    )
                outage = True
            except Exception:
                # A bug here (in on_connect, a delivery, a library) must not end the
                # session silently and leave wait_connected() hanging: say it, go on.
                log.exception("%s: connection to %s failed", self.client_id, self._where)
            finally:
                if not self._closed:
                    self._ready.clear()
            if self._closed:
                return
            # Full jitter keeps a fleet from reconnecting in lockstep after an outage.
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self.reconnect_max_s)

    def _count(
        self, topic: str, payload_len: int, qos: int, *, sent: bool, v5: bool = False
    ) -> None:
        """One PUBLISH went out (``sent``) or came in: its bytes on the wire, and the meter."""
        size = publish_size(topic, payload_len, qos, v5=v5)
        if sent:
            self.wire_out += size
        else:
            self.wire_in += size
        if self.meter is not None:
            self.meter(topic, size, sent)

    # -------------------------------------------------------------- receiving
    async def messages(self) -> AsyncIterator[Message]:
        """Whole messages, across reconnects, until the transport closes."""
        async for message in self._inbox.drain():
            yield message

    def pending(self) -> int:
        return len(self._inbox)

    def _enqueue(self, message: Message) -> None:
        if self._on_message is not None:
            try:
                self._on_message(message)
            except Exception:
                # Raised into the library, it would pass for a broken connection and
                # hide the bug behind a reconnect: say what failed, keep the session.
                log.exception("%s: message handler failed on %s", self.client_id, message.topic)
            return
        if not self._inbox.put(message) and not self._inbox.closed:
            self.dropped += 1
            log.warning("%s: inbox full; message on %s dropped", self.client_id, message.topic)
