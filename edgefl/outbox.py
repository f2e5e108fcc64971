"""Durable FIFO of encoded updates, per-sender sequence numbers and small device state.

One sqlite3 file (WAL, synchronous=FULL): whatever a call returned survives a
reboot or a ``kill -9``. It must never lose an entry before ``ack``, nor hand out a seq twice.
"""

from __future__ import annotations

import builtins
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
from typing import Any

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    topic    TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    created  REAL    NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS seqs (sender TEXT PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Entry:
    """One buffered message: ``id`` orders the FIFO and is never reused."""

    id: int
    topic: str
    payload: bytes
    created: float
    attempts: int


class Outbox:
    """Updates waiting for a PUBACK, oldest first, bounded by count and bytes.

    When a cap would be passed the oldest entries are dropped (a device that has
    been offline for days keeps its newest work), counted in ``dropped``.
    Calls are serialized by a lock, so the asyncio shell may use a worker thread.
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
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: every write below runs in an explicit BEGIN IMMEDIATE..COMMIT.
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._tx() as db:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)

    # ------------------------------------------------------------------ FIFO

    def put(self, topic: str, payload: builtins.bytes) -> int:
        """Append one message; returns its entry id. Drops the oldest past a cap.

        A payload larger than ``max_bytes`` on its own raises ``ValueError``.
        """
        with self._tx() as db:
            return self._insert(db, topic, payload)

    def put_with_seq(
        self, sender: str, topic: str, build: Callable[[int], builtins.bytes]
    ) -> tuple[int, int]:
        """Allocate ``sender``'s next seq and store ``build(seq)`` in one transaction.

        Returns ``(entry_id, seq)``. If ``build`` raises, nothing is stored and the
        seq is not consumed; after a crash either both are on disk or neither is.
        """
        with self._tx() as db:
            seq = self._take_seq(db, sender)
            return self._insert(db, topic, build(seq)), seq

    def peek(self, limit: int = 16) -> list[Entry]:
        """Up to ``limit`` entries, oldest first; they stay in the outbox."""
        rows = self._read(
            "SELECT id, topic, payload, created, attempts FROM entries ORDER BY id LIMIT ?",
            (limit,),
        )
        return [Entry(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def mark_attempt(self, entry_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE entries SET attempts = attempts + 1 WHERE id = ?", (entry_id,))

    def ack(self, entry_id: int) -> None:
        """Remove an entry once its PUBACK arrived; an unknown id is a no-op."""
        with self._tx() as db:
            db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))

    def __len__(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM entries")[0][0])

    @property
    def bytes(self) -> int:
        """Payload bytes currently buffered."""
        return int(self._read("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM entries")[0][0])

    @property
    def dropped(self) -> int:
        """Entries dropped to respect the caps, over the whole life of the file."""
        rows = self._read("SELECT value FROM counters WHERE name = 'dropped'")
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------- seq and state

    def next_seq(self, sender: str) -> int:
        """``sender``'s next sequence number (0, 1, 2, ...), committed before it returns."""
        with self._tx() as db:
            return self._take_seq(db, sender)

    def get_state(self, key: str) -> builtins.bytes | None:
        rows = self._read("SELECT value FROM state WHERE key = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    def set_state(self, key: str, value: builtins.bytes) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO state (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, sqlite3.Binary(value)),
            )

    # ------------------------------------------------------------- lifecycle

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

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock, BEGIN IMMEDIATE; COMMIT on success, ROLLBACK on any error."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _take_seq(self, db: sqlite3.Connection, sender: str) -> int:
        row = db.execute("SELECT next FROM seqs WHERE sender = ?", (sender,)).fetchone()
        seq = int(row[0]) if row else 0
        db.execute(
            "INSERT INTO seqs (sender, next) VALUES (?, ?) "
            "ON CONFLICT(sender) DO UPDATE SET next = excluded.next",
            (sender, seq + 1),
        )
        return seq

    def _insert(self, db: sqlite3.Connection, topic: str, payload: builtins.bytes) -> int:
        if len(payload) > self.max_bytes:
            raise ValueError(f"payload of {len(payload)} bytes exceeds max_bytes={self.max_bytes}")
        cur = db.execute(
            "INSERT INTO entries (topic, payload, created) VALUES (?, ?, ?)",
            (topic, sqlite3.Binary(payload), self._clock()),
        )
        entry_id = int(cur.lastrowid or 0)
        self._trim(db)
        return entry_id

    def _trim(self, db: sqlite3.Connection) -> None:
        count, total = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM entries"
        ).fetchone()
        if count <= self.max_entries and total <= self.max_bytes:
            return
        dropped = 0
        # Oldest first; the newest entry always fits (checked in _insert), so this ends.
        oldest = db.execute("SELECT id, LENGTH(payload) FROM entries ORDER BY id").fetchall()
        for entry_id, size in oldest:
            if count <= self.max_entries and total <= self.max_bytes:
                break
            db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
            count, total, dropped = count - 1, total - size, dropped + 1
        db.execute(
            "INSERT INTO counters (name, value) VALUES ('dropped', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (dropped,),
        )
        log.warning(
            "outbox %s full: dropped %d oldest entries (caps: %d entries, %d bytes)",
            self.path,
            dropped,
            self.max_entries,
            self.max_bytes,
        )
