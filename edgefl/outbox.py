"""Durable FIFO of encoded updates, per-sender sequence numbers and small device state.

One sqlite3 file (WAL, synchronous=FULL): whatever a call returned survives a
reboot or a ``kill -9``. It must never forget an entry before its receipt (or
``ack``) unless a cap or a full disk forces it, nor hand out a seq twice.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from .outbox_file import (
    EVICTION,
    DiskFull,
    DiskSpells,
    NoRoom,
    add_counts,
    checkpoint,
    is_full,
    open_database,
    prepare,
    require_room,
    take_seq,
    trim,
)

__all__ = ["DiskFull", "Entry", "Outbox"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A resend waits ``resend_after`` seconds, doubled per delivery up to this many times.
MAX_BACKOFF_DOUBLINGS = 6

_ENTRY = "id, topic, payload, created, attempts, seq, delivered, deliveries"


@dataclass(frozen=True)
class Entry:
    """One buffered message: ``id`` orders the FIFO and is never reused.

    ``seq`` is the update's seq when it was stored with one; ``delivered`` the time
    of its last PUBACK (None: never acknowledged), ``deliveries`` how many it had.
    """

    id: int
    topic: str
    payload: bytes
    created: float
    attempts: int
    seq: int | None = None
    delivered: float | None = None
    deliveries: int = 0


class Backlog(NamedTuple):
    """What an outbox holds, read at once: for a Status or a metrics record."""

    pending: int  # not delivered yet
    bytes: int  # their payload bytes
    unreceipted: int  # delivered, waiting for a receipt
    dropped: int  # over the life of the file


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(row[0], row[1], bytes(row[2]), row[3], row[4], row[5], row[6], row[7])


class Outbox:
    """Updates waiting for delivery and then for their receipt, oldest first, bounded.

    An entry stored with a seq stays after its PUBACK (``mark_delivered``) until
    ``settle`` names its seq; one without a seq leaves at its PUBACK. When a cap
    would be passed, or the disk is full, delivered entries are forgotten first,
    then the oldest undelivered ones are dropped (a device that has been offline
    for days keeps its newest work), counted in ``evicted`` and ``dropped``.
    Calls are serialized by a lock, so the asyncio shell may use worker threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_entries: int = 1000,
        max_bytes: int = 256 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        #: unix seconds: stamps ``created`` and ``delivered``; ``due`` compares with it.
        self.clock = clock
        self._lock = threading.RLock()
        self._disk = DiskSpells(self.path)
        self._db: sqlite3.Connection | None = open_database(self.path)
        try:
            self.incarnation = self._write(prepare)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ FIFO

    def put(self, topic: str, payload: bytes) -> int:
        """Append one message; returns its entry id. Drops the oldest past a cap.

        A payload larger than ``max_bytes`` on its own raises ``ValueError``; a disk
        too full for it even once the outbox is empty raises ``DiskFull``.
        """
        return self._write(lambda db: self._insert(db, topic, payload))

    def put_with_seq(
        self, sender: str, topic: str, build: Callable[[int], bytes]
    ) -> tuple[int, int]:
        """Allocate ``sender``'s next seq and store ``build(seq)`` in one transaction.

        Returns ``(entry_id, seq)``. If ``build`` raises, nothing is stored and the
        seq is not consumed; after a crash either both are on disk or neither is.
        ``build`` may run more than once (a full disk is retried after making room).
        """

        def write(db: sqlite3.Connection) -> tuple[int, int]:
            seq = take_seq(db, sender)
            return self._insert(db, topic, build(seq), sender=sender, seq=seq), seq

        return self._write(write)

    def peek(self, limit: int = 16) -> list[Entry]:
        """Up to ``limit`` entries, delivered or not, oldest first; they stay in the outbox."""
        rows = self._read(f"SELECT {_ENTRY} FROM entries ORDER BY id LIMIT ?", (limit,))
        return [_entry(r) for r in rows]

    def due(
        self, limit: int = 16, *, resend_after: float, since: float = 0.0, after: int = 0
    ) -> list[Entry]:
        """Up to ``limit`` entries to publish now, oldest first, with ids above ``after``.

        Those never delivered, those delivered before ``since`` (in an earlier session:
        the broker may have lost them), and those whose receipt is late: delivered
        ``resend_after`` seconds ago, doubled per delivery (at most 64 times that).
        """
        rows = self._read(
            f"SELECT {_ENTRY} FROM entries WHERE id > ? AND (delivered IS NULL "
            "OR delivered < ? OR delivered + ? * (1 << MIN(deliveries - 1, ?)) <= ?) "
            "ORDER BY id LIMIT ?",
            (after, since, resend_after, MAX_BACKOFF_DOUBLINGS, self.clock(), limit),
        )
        return [_entry(r) for r in rows]

    def mark_attempt(self, entry_id: int) -> None:
        """Count a publish that failed (offline, or no PUBACK in time)."""
        self._change("UPDATE entries SET attempts = attempts + 1 WHERE id = ?", (entry_id,))

    def mark_delivered(self, entry_id: int) -> None:
        """The broker acknowledged the entry: it waits for its receipt, or leaves if no
        receipt can name it (stored without a seq). An unknown id is a no-op."""
        with self._lock:
            marked = self._change(
                "UPDATE entries SET delivered = ?, deliveries = deliveries + 1 "
                "WHERE id = ? AND seq IS NOT NULL",
                (self.clock(), entry_id),
            )
            if not marked:
                self.ack(entry_id)

    def ack(self, entry_id: int) -> None:
        """Remove an entry at once (delivered, for a caller without receipts); unknown ids
        are ignored."""
        self._change("DELETE FROM entries WHERE id = ?", (entry_id,))

    def settle(self, sender: str, inc: int, seq: int) -> int:
        """A receipt: forget ``sender``'s delivered entries up to ``seq`` if ``inc`` is this
        file's incarnation (one for an earlier file names other updates). One never
        acknowledged stays: a later seq may have overtaken it. Returns how many."""
        if inc != self.incarnation:
            return 0
        return self._change(
            "DELETE FROM entries WHERE sender = ? AND seq <= ? AND deliveries > 0", (sender, seq)
        )

    def __len__(self) -> int:
        """Entries not delivered yet (a delivered one waiting for its receipt is not counted)."""
        return int(self._read("SELECT COUNT(*) FROM entries WHERE delivered IS NULL")[0][0])

    def backlog(self) -> Backlog:
        """Counts in one read (a blocking call: off the event loop)."""
        ((pending, size, unreceipted),) = self._read(
            "SELECT COALESCE(SUM(delivered IS NULL), 0),"
            " COALESCE(SUM(CASE WHEN delivered IS NULL THEN LENGTH(payload) END), 0),"
            " COALESCE(SUM(delivered IS NOT NULL), 0) FROM entries"
        )
        return Backlog(int(pending), int(size), int(unreceipted), self.dropped)

    @property
    def dropped(self) -> int:
        """Undelivered entries dropped for a cap or a full disk, over the life of the file."""
        return self._counter("dropped")

    @property
    def evicted(self) -> int:
        """Delivered entries forgotten before their receipt, for a cap or a full disk."""
        return self._counter("evicted")

    # ------------------------------------------------------- seq and state

    def lowest_seq(self, sender: str) -> int | None:
        """The lowest seq of ``sender``'s entries still here (None: there are none)."""
        rows = self._read("SELECT MIN(seq) FROM entries WHERE sender = ?", (sender,))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def next_seq(self, sender: str) -> int:
        """``sender``'s next sequence number (0, 1, 2, ...), committed before it returns."""
        return self._write(lambda db: take_seq(db, sender))

    def get_state(self, key: str) -> bytes | None:
        rows = self._read("SELECT value FROM state WHERE key = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    def set_state(self, key: str, value: bytes) -> None:
        """Store small bytes under ``key``; on a full disk, entries make room for them."""

        def write(db: sqlite3.Connection) -> None:
            require_room(self.path, len(value))
            db.execute(
                "INSERT INTO state (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, sqlite3.Binary(value)),
            )

        self._write(write)

    # ------------------------------------------------------------- lifecycle

    @contextmanager
    def held(self) -> Iterator[Outbox]:
        """Hold the outbox for several calls from one thread: no other thread's call,
        nor ``close``, falls between them."""
        with self._lock:
            yield self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- internals

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"outbox {self.path} is closed")
        return self._db

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._conn().execute(sql, args).fetchall())

    def _counter(self, name: str) -> int:
        rows = self._read("SELECT value FROM counters WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock, BEGIN IMMEDIATE; COMMIT on success, ROLLBACK on any error."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # sqlite has rolled back itself after some errors
                    db.execute("ROLLBACK")
                raise

    def _write(self, write: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``write`` in a transaction, then checkpoint (the WAL holds one write at
        most); on a full disk, evict entries until it fits."""
        with self._lock:
            roomy = True
            while True:
                try:
                    with self._tx() as db:
                        result = write(db)
                except (sqlite3.OperationalError, NoRoom) as exc:
                    if not isinstance(exc, NoRoom) and not is_full(exc):
                        raise
                    roomy = False
                    self._disk_full(exc)
                    if not self._evict_one():
                        raise DiskFull(f"outbox {self.path}: {exc}") from None
                    continue
                self._checkpoint()
                if roomy:
                    self._disk.roomy()
                return result

    def _change(self, sql: str, args: tuple[object, ...]) -> int:
        """One small statement in a transaction, then a checkpoint; ``DiskFull`` if it
        does not fit. Returns the rows it changed."""
        try:
            with self._tx() as db:
                changed = int(db.execute(sql, args).rowcount)
        except sqlite3.OperationalError as exc:
            if not is_full(exc):
                raise
            self._disk_full(exc)
            raise DiskFull(f"outbox {self.path}: {exc}") from None
        if changed:
            self._checkpoint()
        return changed

    def _checkpoint(self) -> None:
        with self._lock:
            checkpoint(self._conn(), self.path)

    def _disk_full(self, exc: Exception) -> None:
        self._disk.full(exc)
        self._checkpoint()

    def _insert(
        self,
        db: sqlite3.Connection,
        topic: str,
        payload: bytes,
        *,
        sender: str | None = None,
        seq: int | None = None,
    ) -> int:
        if len(payload) > self.max_bytes:
            raise ValueError(f"payload of {len(payload)} bytes exceeds max_bytes={self.max_bytes}")
        require_room(self.path, len(payload))
        cur = db.execute(
            "INSERT INTO entries (topic, payload, created, sender, seq) VALUES (?, ?, ?, ?, ?)",
            (topic, sqlite3.Binary(payload), self.clock(), sender, seq),
        )
        entry_id = int(cur.lastrowid or 0)
        trim(db, self.max_entries, self.max_bytes, self.path)
        return entry_id

    def _evict_one(self) -> bool:
        """Make room on a full disk: delete one entry, eviction order. False if none fits."""
        try:
            with self._tx() as db:
                row = db.execute(
                    f"SELECT id, delivered IS NOT NULL FROM entries {EVICTION} LIMIT 1"
                ).fetchone()
                if row is None:
                    return False
                db.execute("DELETE FROM entries WHERE id = ?", (row[0],))
                add_counts(db, {"evicted" if row[1] else "dropped": 1})
        except sqlite3.OperationalError as exc:
            if not is_full(exc):
                raise
            return False  # not even a delete fits: wait for the disk to have room
        log.debug("outbox %s: disk full: removed entry %d to make room", self.path, row[0])
        self._checkpoint()
        return True
