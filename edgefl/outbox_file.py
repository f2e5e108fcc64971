"""The sqlite file behind an outbox: its schema and incarnation, opening, checkpoints,
seqs, counters and caps.

Tells a damaged file (moved aside, a new one created) from a full disk (opened
anyway, without shared memory). It never deletes a file it could not read.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import sqlite3
import time
from pathlib import Path

from .errors import EdgeflError

log = logging.getLogger("edgefl.outbox")  # part of the outbox, as its users see it

#: Eviction order: delivered entries (likely at the node already) first, then the oldest.
EVICTION = "ORDER BY delivered IS NULL, id"

# sqlite result codes (the primary code is the low byte of an extended one).
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26
#: the shared-memory index could not be sized: its file system is full.
SQLITE_IOERR_SHMSIZE = SQLITE_IOERR | (19 << 8)

#: The WAL is checkpointed by sqlite itself past this many pages (4 KiB each) and cut
#: back to JOURNAL_LIMIT bytes after a checkpoint, so it never grows round after round.
AUTOCHECKPOINT_PAGES = 64
JOURNAL_LIMIT = 0
#: Incarnations are drawn from 1..2**53: exact in a float64, like every counter on the wire.
MAX_INCARNATION = 2**53

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    created    REAL    NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS seqs (sender TEXT PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)
"""
#: Entry columns added with delivery receipts: an older file gets them when opened.
_DELIVERY_COLUMNS = {
    "sender": "TEXT",
    "seq": "INTEGER",
    "delivered": "REAL",
    "deliveries": "INTEGER NOT NULL DEFAULT 0",
}
#: A full disk is logged at ERROR at most this often (seconds).
FULL_LOG_S = 3600.0
#: Free space a write must leave beyond twice its size (the WAL, then the file).
ROOM_MARGIN = 64 * 1024


class DiskFull(EdgeflError):
    """The disk that holds the outbox has no room for this write; nothing was written."""


class NoRoom(Exception):
    """A write that the file system could not be sure to fold back into the file."""


class DiskSpells:
    """Whether the outbox's disk is full now. A spell is logged at ERROR at most once
    per FULL_LOG_S: a disk the outbox's own entries keep full fills again every round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.now = False
        self._logged = -math.inf
        self._level = logging.INFO

    def full(self, exc: Exception) -> None:
        if self.now:
            return
        self.now = True
        at = time.monotonic()
        quiet = at - self._logged < FULL_LOG_S
        self._level = logging.DEBUG if quiet else logging.INFO
        if not quiet:
            self._logged = at
        log.log(
            logging.DEBUG if quiet else logging.ERROR,
            "outbox %s: the disk is full (%s): keeping only what fits, delivered and then "
            "oldest entries go first",
            self.path,
            exc,
        )

    def roomy(self) -> None:
        """A write fitted without making room."""
        if self.now:
            self.now = False
            log.log(self._level, "outbox %s: the disk has room again", self.path)


def require_room(path: Path, size: int) -> None:
    """Refuse a write of ``size`` bytes that the WAL could take but the file could then
    not grow to fold in: sqlite would hold a WAL it cannot checkpoint, and could not
    even delete an entry to make room, until some space came back."""
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    if free < 2 * size + ROOM_MARGIN:
        raise NoRoom(f"database or disk is full: {free} bytes free for {size}")


def is_full(exc: sqlite3.Error) -> bool:
    """Whether a sqlite error means the file system (or the database's own limit) is full."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # Python 3.10 has no error codes: read the message
        return "database or disk is full" in str(exc)
    return code & 0xFF == SQLITE_FULL or code == SQLITE_IOERR_SHMSIZE


def _is_damaged(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # Python 3.10 has no error codes: read the message
        return "not a database" in str(exc) or "malformed" in str(exc)
    return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)


class Damaged(sqlite3.DatabaseError):
    """The file opened but failed sqlite's own check."""


def open_database(path: Path) -> sqlite3.Connection:
    """Open (or create) the outbox file, ready for use and checked.

    An empty, non-sqlite or damaged file is renamed ``<name>.corrupt-<unix time>``
    (its WAL beside it) with one ERROR line, and a new file is created in its place.
    On a full disk the file is opened without its shared-memory index (exclusive
    locking: other processes cannot open it until this one closes it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size == 0:
        _set_aside(path, "empty file")
    try:
        return _connect(path, exclusive=False)
    except sqlite3.DatabaseError as exc:
        if is_full(exc):
            log.error(
                "outbox %s: the disk is full (%s): opened without shared memory; "
                "no other process can open it until this one stops",
                path,
                exc,
            )
            return _connect(path, exclusive=True)
        if not _is_damaged(exc):
            raise
        _set_aside(path, str(exc))
    return _connect(path, exclusive=False)


def prepare(db: sqlite3.Connection) -> int:
    """In a transaction: create or complete the schema; return the file's incarnation,
    drawn when the file was created (or first opened by a version that has them)."""
    for stmt in filter(str.strip, _SCHEMA.split(";")):
        db.execute(stmt)
    have = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
    for name, kind in _DELIVERY_COLUMNS.items():
        if name not in have:
            db.execute(f"ALTER TABLE entries ADD COLUMN {name} {kind}")
    row = db.execute("SELECT value FROM meta WHERE key = 'incarnation'").fetchone()
    if row:
        return int(row[0])
    inc = 1 + secrets.randbelow(MAX_INCARNATION)
    db.execute("INSERT INTO meta (key, value) VALUES ('incarnation', ?)", (inc,))
    return inc


def checkpoint(db: sqlite3.Connection, path: Path) -> None:
    """Fold the WAL into the file and cut it to nothing, so that its pages are free."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.OperationalError as exc:  # busy, or full: sqlite retries at commits
        log.debug("outbox %s: checkpoint skipped: %s", path, exc)


def _connect(path: Path, *, exclusive: bool) -> sqlite3.Connection:
    # Autocommit mode: the outbox runs every write in an explicit BEGIN IMMEDIATE..COMMIT.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        if exclusive:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
        # Before the first table: pages freed by a delete go back to the file system.
        db.execute("PRAGMA auto_vacuum=FULL")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit={JOURNAL_LIMIT}")
        verdict = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if verdict != "ok":
            raise Damaged(f"database disk image is malformed: {verdict}")
        _vacuum_legacy(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _vacuum_legacy(db: sqlite3.Connection, path: Path) -> None:
    """A file created before auto_vacuum keeps its freed pages; rebuild it once."""
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 0:
        return
    if not db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
        return  # a new file: the pragma applies to its first table
    try:
        db.execute("VACUUM")
    except sqlite3.OperationalError as exc:  # a full disk or a busy file: try next start
        log.warning("outbox %s: not compacted (%s); freed pages stay in the file", path, exc)


def _set_aside(path: Path, reason: str) -> None:
    stamp = int(time.time())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    wal = Path(f"{path}-wal")
    if wal.exists():
        os.replace(wal, f"{target}-wal")
    Path(f"{path}-shm").unlink(missing_ok=True)  # derived from the WAL; rebuilt on open
    log.error(
        "outbox %s is unreadable (%s): moved aside to %s; a new outbox starts under a new "
        "incarnation (the updates it held are lost)",
        path,
        reason,
        target.name,
    )


def take_seq(db: sqlite3.Connection, sender: str) -> int:
    """The next seq of ``sender``, taken (in the caller's transaction)."""
    row = db.execute("SELECT next FROM seqs WHERE sender = ?", (sender,)).fetchone()
    seq = int(row[0]) if row else 0
    db.execute(
        "INSERT INTO seqs (sender, next) VALUES (?, ?) "
        "ON CONFLICT(sender) DO UPDATE SET next = excluded.next",
        (sender, seq + 1),
    )
    return seq


def trim(db: sqlite3.Connection, max_entries: int, max_bytes: int, path: Path) -> None:
    """Drop entries, eviction order, until the file is within its caps."""
    count, total = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM entries"
    ).fetchone()
    if count <= max_entries and total <= max_bytes:
        return
    gone = {"dropped": 0, "evicted": 0}
    # The newest entry always fits (checked in _insert), so this ends before it.
    for entry_id, size, delivered in db.execute(
        f"SELECT id, LENGTH(payload), delivered IS NOT NULL FROM entries {EVICTION}"
    ).fetchall():
        if count <= max_entries and total <= max_bytes:
            break
        db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        count, total = count - 1, total - size
        gone["evicted" if delivered else "dropped"] += 1
    add_counts(db, gone)
    level = logging.WARNING if gone["dropped"] else logging.DEBUG
    log.log(
        level,
        "outbox %s full: dropped %d oldest entries, forgot %d delivered "
        "(caps: %d entries, %d bytes)",
        path,
        gone["dropped"],
        gone["evicted"],
        max_entries,
        max_bytes,
    )


def add_counts(db: sqlite3.Connection, counts: dict[str, int]) -> None:
    """Add to the file's lifetime counters (``dropped``, ``evicted``)."""
    for name, n in counts.items():
        if n:
            db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )
