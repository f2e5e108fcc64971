"""A node's journal of the raw updates admitted into its open round, so a crash loses none.

One append-only file in the node's state directory, written by a writer thread so
that the receive path only queues; compacted to the still-unsettled entries after
each checkpoint. It must never block the event loop, nor grow past its bounds (it
stops taking instead).
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: An update's identity at the node: (sender, incarnation, seq).
Key = tuple[str, int, int]

#: magic, payload length, inc, seq, sender length; then the sender and the payload.
_HEAD = struct.Struct("<4sIqqH")
_MAGIC = b"EFJ1"


class Journal:
    """``append`` each admitted update; ``retain`` the keys still unsettled after a checkpoint.

    Records are length-framed; a kill mid-write leaves at most a torn last record,
    which the next open cuts off. Nothing is fsynced: an entry written survives a
    killed process (it is in the page cache), not a power cut. Past ``max_entries``
    or ``max_bytes`` on disk, or ``max_queued_bytes`` not yet written, an update is
    not journaled, only counted in ``skipped``: its sender's outbox still holds it
    until the node's receipt.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_entries: int = 100_000,
        max_bytes: int = 512 * 1024 * 1024,
        max_queued_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_queued_bytes = max_queued_bytes
        self.skipped = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._index: dict[Key, tuple[int, int]] = {}  # key -> (offset, record length)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._end = self._scan()
        self._lock = threading.Lock()
        self._count, self._bytes = len(self._index), self._end  # written and queued
        self._queued, self._queued_n = 0, 0  # queued only
        self._queue: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failed = False

    def entries(self) -> list[tuple[Key, bytes]]:
        """What the journal holds, oldest first; read it before ``start``."""
        return [(key, self._payload(key, where)) for key, where in self._index.items()]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"journal-{self.path}", daemon=True)
        self._thread.start()

    def append(self, key: Key, payload: bytes) -> bool:
        """Queue one admitted update; False if a bound keeps it out (counted)."""
        size = _HEAD.size + len(key[0].encode()) + len(payload)
        with self._lock:
            if (
                self._count >= self.max_entries
                or self._bytes + size > self.max_bytes
                or self._queued + size > self.max_queued_bytes
            ):
                self.skipped += 1
                return False
            self._count += 1
            self._bytes += size
            self._queued += size
            self._queued_n += 1
        self._queue.put(("add", (key, payload, size)))
        return True

    def retain(self, keys: Iterable[Key]) -> None:
        """Forget every entry whose key is not in ``keys`` (queued: after earlier appends)."""
        self._queue.put(("retain", frozenset(keys)))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        done = threading.Event()
        self._queue.put(("sync", done))
        return done.wait(timeout)

    def close(self) -> None:
        """Write what is queued, stop the writer, close the file. The entries stay."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        os.close(self._fd)

    # ---------------------------------------------------------------- reading
    def _scan(self) -> int:
        """Index the whole records; cut a torn tail off. Returns the end of the last."""
        size, offset = os.fstat(self._fd).st_size, 0
        while offset + _HEAD.size <= size:
            magic, length, inc, seq, slen = _HEAD.unpack(os.pread(self._fd, _HEAD.size, offset))
            record = _HEAD.size + slen + length
            if magic != _MAGIC or offset + record > size:
                break
            sender = os.pread(self._fd, slen, offset + _HEAD.size).decode(errors="replace")
            self._index[(sender, inc, seq)] = (offset, record)
            offset += record
        if offset < size:
            log.warning("journal %s: %d torn bytes at its end cut off", self.path, size - offset)
            os.ftruncate(self._fd, offset)
        return offset

    def _payload(self, key: Key, where: tuple[int, int]) -> bytes:
        offset, record = where
        skip = _HEAD.size + len(key[0].encode())
        return os.pread(self._fd, record - skip, offset + skip)

    # ---------------------------------------------------------------- writer
    def _run(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            kind, arg = op
            if kind == "sync":
                arg.set()
                continue
            try:
                if kind == "add":
                    self._add(*arg)
                else:
                    self._retain(arg)
                self._failed = False
            except OSError as exc:  # a full disk, say: the children still hold their updates
                if not self._failed:
                    log.error(
                        "journal %s: %s; updates not journaled until it works", self.path, exc
                    )
                self._failed = True
                self._recount()

    def _add(self, key: Key, payload: bytes, size: int) -> None:
        with self._lock:
            self._queued -= size
            self._queued_n -= 1
        if key in self._index:  # a replayed entry: it is there already
            with self._lock:
                self._count, self._bytes = self._count - 1, self._bytes - size
            return
        sender = key[0].encode()
        head = _HEAD.pack(_MAGIC, len(payload), key[1], key[2], len(sender))
        written = os.pwritev(self._fd, [head, sender, payload], self._end)
        if written != size:
            raise OSError(f"short write: {written} of {size} bytes")
        self._index[key] = (self._end, size)
        self._end += size

    def _retain(self, keep: frozenset[Key]) -> None:
        kept = {k: w for k, w in self._index.items() if k in keep}
        if len(kept) == len(self._index):
            return
        if kept:  # the few updates carried over: rewrite them into a new file
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            index, end = {}, 0
            for key, (offset, record) in kept.items():
                os.pwrite(fd, os.pread(self._fd, record, offset), end)
                index[key], end = (end, record), end + record
            os.replace(tmp, self.path)
            os.close(self._fd)
            self._fd, self._index, self._end = fd, index, end
        else:
            os.ftruncate(self._fd, 0)
            self._index, self._end = {}, 0
        self._recount()

    def _recount(self) -> None:
        with self._lock:
            self._count = len(self._index) + self._queued_n
            self._bytes = self._end + self._queued


def replay(
    journal: Journal, admit: Callable[[str, bytes], None], waiting: Callable[[str], bool]
) -> list[tuple[Key, bytes]]:
    """Feed the journal's entries, oldest first, to ``admit(sender, payload)``.

    Only one update per sender waits for a round's announcement, so a sender's later
    entries (those ``waiting`` says it has one already) are handed back, for after it.
    """
    later = []
    for key, payload in journal.entries():
        if waiting(key[0]):
            later.append((key, payload))
        else:
            admit(key[0], payload)
    return later
