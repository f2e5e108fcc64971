"""The one error family edgefl raises on purpose: ``EdgeflError`` and its children.

Each part converts what its libraries raise into a child of this at its edge, as
aiomqtt does with ``MqttError``. Programming errors are never wrapped.
"""

from __future__ import annotations

import enum


class EdgeflError(Exception):
    """Base of every error edgefl raises by design."""


class Reason(str, enum.Enum):
    """Why an incoming message was refused. Counted per reason in Metrics."""

    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    SHAPE = "shape"
    NONFINITE = "nonfinite"
    DUPLICATE = "duplicate"
    STALE = "stale"
    UNKNOWN_SENDER = "unknown_sender"
    BAD_SIGNATURE = "bad_signature"
    NORM = "norm"
    CHUNK_TIMEOUT = "chunk_timeout"
    #: a third update from one sender in one round (one is folded, one carried over).
    REPEAT = "repeat"
    #: a model whose version goes back, or jumps further ahead than allowed.
    VERSION = "version"


class Rejected(EdgeflError):
    """An untrusted message (update, model, status, chunk, config) failed a check;
    ``reason`` says which. Raised at the edge, counted, logged once, never fatal."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
