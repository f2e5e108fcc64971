"""Chunking: payloads over a broker's packet limit travel as several messages.

``split`` cuts a payload into self-describing chunk maps (msgpack), and
``Reassembler`` rebuilds them in bounded memory, whatever order and duplicates
QoS 1 delivers. Retained chunks live on sub-topics (``chunk_topic``). No I/O here.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from ..wire import DEFAULT_MAX_MESSAGE_BYTES, Reason, Rejected, pack_map, unpack_map

_CHUNK_MARK = b"\xa5chunk"  # msgpack fixstr "chunk": the first key of every chunk map
_CHUNK_OVERHEAD = 200


def is_chunk(payload: bytes) -> bool:
    """Cheap test, no parsing: chunk maps always start with the key ``chunk``."""
    return len(payload) > 7 and 0x80 <= payload[0] <= 0x8F and payload[1:7] == _CHUNK_MARK


def split(payload: bytes, max_bytes: int, *, chunk_id: str | None = None) -> list[bytes]:
    """Split ``payload`` into chunk messages of at most ``max_bytes`` each.

    A payload that fits travels whole (the list holds it unchanged).
    """
    if len(payload) <= max_bytes:
        return [payload]
    part_size = max_bytes - _CHUNK_OVERHEAD
    if part_size < 1024:
        raise ValueError(f"max_bytes={max_bytes} is too small to chunk (need >= 1224)")
    digest = hashlib.sha256(payload).digest()
    cid = chunk_id or digest[:8].hex()
    total = -(-len(payload) // part_size)
    return [
        pack_map(
            {
                "chunk": 1,
                "id": cid,
                "index": i,
                "total": total,
                "sha256": digest,
                "part": payload[i * part_size : (i + 1) * part_size],
            }
        )
        for i in range(total)
    ]


class _PendingSet:
    __slots__ = ("digest", "first_seen", "parts", "size", "total")

    def __init__(self, total: int, digest: bytes, now: float) -> None:
        self.total = total
        self.digest = digest
        self.first_seen = now
        self.parts: dict[int, bytes] = {}
        self.size = 0


class Reassembler:
    """Rebuilds chunked payloads in bounded memory.

    Duplicated chunks are ignored, reordered ones are fine, a corrupted set
    fails its digest (``malformed``), a set missing chunks expires after
    ``timeout_s`` (``chunk_timeout``, counted in ``expired``). When pending
    bytes or sets would pass their caps, the oldest sets are dropped first.
    """

    def __init__(
        self,
        *,
        max_payload_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_pending_bytes: int = 256 * 1024 * 1024,
        max_sets: int = 1024,
        timeout_s: float = 60.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.max_pending_bytes = max_pending_bytes
        self.max_sets = max_sets
        self.timeout_s = timeout_s
        self._clock = clock
        self._sets: dict[tuple[str, str], _PendingSet] = {}
        self.pending_bytes = 0
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._sets)

    def feed(self, source: str, payload: bytes) -> bytes | None:
        """Give one message from ``source``; returns a whole payload when one is complete.

        A message that is not a chunk is returned as is.
        """
        if not is_chunk(payload):
            return payload
        self.expire()
        chunk = self._parse(payload)
        key = (source, chunk["id"])
        pending = self._sets.get(key)
        if pending is None:
            pending = _PendingSet(chunk["total"], chunk["sha256"], self._clock())
            self._sets[key] = pending
        elif pending.total != chunk["total"] or pending.digest != chunk["sha256"]:
            self._drop(key)
            raise Rejected(Reason.MALFORMED, "chunk disagrees with its set")
        index, part = chunk["index"], chunk["part"]
        if index in pending.parts:
            return None  # duplicate delivery (QoS 1 may redeliver)
        if pending.size + len(part) > self.max_payload_bytes:
            self._drop(key)
            raise Rejected(Reason.OVERSIZED, "chunked payload exceeds the limit")
        self._make_room(len(part), keep=key)
        pending.parts[index] = part
        pending.size += len(part)
        self.pending_bytes += len(part)
        if len(pending.parts) < pending.total:
            return None
        self._drop(key)
        whole = b"".join(pending.parts[i] for i in range(pending.total))
        if hashlib.sha256(whole).digest() != pending.digest:
            raise Rejected(Reason.MALFORMED, "chunked payload fails its sha256")
        return whole

    def expire(self) -> int:
        """Drop sets older than the timeout; returns how many expired now."""
        now = self._clock()
        old = [k for k, s in self._sets.items() if now - s.first_seen > self.timeout_s]
        for key in old:
            self._drop(key)
        self.expired += len(old)
        return len(old)

    def _parse(self, payload: bytes) -> dict[str, Any]:
        obj = unpack_map(payload, self.max_payload_bytes + _CHUNK_OVERHEAD)
        try:
            cid, index, total = obj["id"], obj["index"], obj["total"]
            digest, part = obj["sha256"], obj["part"]
        except KeyError as exc:
            raise Rejected(Reason.MALFORMED, f"chunk lacks {exc}") from None
        ok = (
            isinstance(cid, str)
            and 0 < len(cid) <= 64
            and isinstance(total, int)
            and isinstance(index, int)
            and 0 <= index < total
            and isinstance(digest, bytes)
            and len(digest) == 32
            and isinstance(part, bytes)
        )
        if not ok:
            raise Rejected(Reason.MALFORMED, "bad chunk header")
        return obj

    def _make_room(self, incoming: int, keep: tuple[str, str]) -> None:
        while self._sets and (
            self.pending_bytes + incoming > self.max_pending_bytes
            or len(self._sets) > self.max_sets
        ):
            oldest = next(k for k in self._sets if k != keep) if len(self._sets) > 1 else None
            if oldest is None:
                raise Rejected(Reason.OVERSIZED, "chunked payload exceeds pending cap")
            self._drop(oldest)
            self.evicted += 1

    def _drop(self, key: tuple[str, str]) -> None:
        pending = self._sets.pop(key, None)
        if pending is not None:
            self.pending_bytes -= pending.size


def chunk_topic(topic: str, index: int) -> str:
    """Where chunk ``index`` of a retained payload on ``topic`` is kept."""
    return f"{topic}/chunk/{index}"


def chunk_source(topic: str) -> str:
    """The topic a (retained) chunk belongs to."""
    head, sep, tail = topic.rpartition("/chunk/")
    return head if sep and tail.isdigit() else topic
