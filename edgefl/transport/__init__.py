"""Transports: how messages travel between edgefl's roles.

``Transport`` (``mqtt.py``) is the MQTT session every role runs; ``MemoryTransport``
on a ``MemoryBroker`` (``memory.py``) is the same surface in-process, for unit
tests; ``AnyTransport`` (``base.py``) is the shape both have. Chunking of large
payloads is in ``chunks.py``.
"""

from __future__ import annotations

from .base import (
    LOST,
    AnyTransport,
    Message,
    NotConnected,
    PublishTimeout,
    TransportClosed,
    TransportError,
    TransportFactory,
    Will,
    publish_size,
)
from .chunks import Reassembler, chunk_source, chunk_topic, is_chunk, split
from .connection import OnConnect
from .memory import MemoryBroker, MemoryTransport
from .mqtt import SESSION_EXPIRY_S, Transport, tls_context

__all__ = [
    "LOST",
    "SESSION_EXPIRY_S",
    "AnyTransport",
    "MemoryBroker",
    "MemoryTransport",
    "Message",
    "NotConnected",
    "OnConnect",
    "PublishTimeout",
    "Reassembler",
    "Transport",
    "TransportClosed",
    "TransportError",
    "TransportFactory",
    "Will",
    "chunk_source",
    "chunk_topic",
    "is_chunk",
    "publish_size",
    "split",
    "tls_context",
]
