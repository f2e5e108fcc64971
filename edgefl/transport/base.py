"""What the shells use of a transport, whichever bus is under it, and its errors.

``AnyTransport`` is the shape both backends have (``Transport`` over MQTT,
``MemoryTransport`` in-process); code typed against it runs on either. No I/O here.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import EdgeflError
from ..wire import Reason


class TransportError(EdgeflError):
    """A message could not travel; the caller keeps its data."""


class NotConnected(TransportError, ConnectionError):
    """The broker is not reachable right now; the caller keeps its data and retries."""


class PublishTimeout(TransportError, TimeoutError):
    """The broker did not acknowledge a QoS 1 publish within the timeout."""


class TransportClosed(NotConnected):
    """The transport was closed: nothing will travel through it again.

    A ``NotConnected`` so that code which keeps its data for a later session
    does the right thing when the session has ended.
    """


#: What a publish raises when the message did not (or may not have) gone out: offline,
#: closed, or no acknowledgement in time. The caller keeps the message for later.
LOST: tuple[type[BaseException], ...] = (NotConnected, TimeoutError, asyncio.TimeoutError)


def publish_size(topic: str, payload_len: int, qos: int = 1, *, v5: bool = False) -> int:
    """Bytes one PUBLISH packet takes on the wire: fixed header, topic, packet id, properties.

    The fixed header is one byte and the remaining length (1-4 bytes); QoS 1 adds a
    two-byte packet id, MQTT 5 a properties length (one byte: edgefl sends none).
    """
    rest = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + (1 if v5 else 0) + payload_len
    length_bytes = 1 if rest < 128 else 2 if rest < 16384 else 3 if rest < 2097152 else 4
    return 1 + length_bytes + rest


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


class AnyTransport(Protocol):
    """One client's long-lived session with a broker, as the shells use it.

    ``async with t`` connects in the background and keeps reconnecting; the
    subscriptions made before or after are kept across reconnects.
    """

    client_id: str
    #: incoming messages refused before delivery (a bad chunk), by reason
    rejected: Counter[Reason]
    #: PUBLISH packets' bytes on the wire (``publish_size``), sent and received
    wire_out: int
    wire_in: int
    #: told of every PUBLISH: ``(topic, packet bytes, sent)``
    meter: Callable[[str, int, bool], None] | None

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for a live connection: ``asyncio.TimeoutError`` after ``timeout`` (at
        once if the transport is closed); unbounded, ``TransportClosed`` once closed."""

    async def subscribe(self, topic: str, qos: int = 1) -> None: ...

    async def unsubscribe(self, topic: str) -> None:
        """Forget a subscription, now if connected and in every later session."""

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish; for QoS 1 return once the broker acknowledged. ``NotConnected``
        (``TransportClosed`` once closed) or ``PublishTimeout``: the caller keeps the data."""

    def messages(self) -> AsyncIterator[Message]:
        """Whole messages as they arrive, across reconnects; ends when the transport closes."""
        ...

    async def close(self) -> None:
        """Disconnect cleanly (the broker does not publish the will) and stop reconnecting."""

    async def __aenter__(self) -> AnyTransport: ...

    async def __aexit__(self, *exc: object) -> None: ...


class TransportFactory(Protocol):
    """How a shell gets its session: ``factory(client_id, will=..., ...)``.

    The default is ``mqtt.Transport`` on the role's ``[mqtt]`` settings;
    ``MemoryBroker.factory()`` gives in-memory sessions for unit tests.
    """

    def __call__(
        self,
        client_id: str,
        *,
        will: Will | None = None,
        on_connect: Any = None,
        on_message: Callable[[Message], None] | None = None,
        persistent: bool = False,
        max_payload_bytes: int = ...,
    ) -> AnyTransport: ...
