"""Atomic save and restore of an aggregator's state: model, version, round, last seqs.

A save either lands whole or not at all (temp file, fsync, rename, fsync dir);
a load never returns a damaged generation: it falls back to the previous one.
Beside them, a small mark of what the node has published, which no fallback undoes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from .errors import EdgeflError
from .params import Params, from_bytes, to_bytes

log = logging.getLogger(__name__)

MAGIC = b"EDGEFLCK"
FORMAT_VERSION = 2
_HEADER_LEN = struct.Struct("<I")
_GENERATION = re.compile(r"^state-(\d{10})-v(\d+)-r\d+\.ckpt(\.corrupt)?$")
_TEMP_PREFIX = ".tmp-state-"
MARK_NAME = "published.mark"


class CorruptCheckpoint(EdgeflError):
    """A checkpoint file failed its magic, format, length, checksum or schema check."""


@dataclass
class NodeState:
    """What an aggregator needs to resume at the same version and still reject duplicates."""

    params: Params
    version: int
    round: int
    parent_version: int | None
    last_seq: dict[str, int]
    #: anything msgpack can carry (str, int, float, bool, None, bytes, list, dict);
    #: tuples come back as lists.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Published:
    """What a node has put on the broker, kept apart from the checkpoints it outlives.

    ``version``: the highest version it ever published (-1: none), so that a node
    that falls back to an older checkpoint resumes past it and never publishes two
    models under one number. ``whole`` and ``chunks``: where a retained model of it
    may still be, on the model topic and on ``chunks`` chunk sub-topics.
    """

    version: int = -1
    whole: bool = False
    chunks: int = 0


class CheckpointStore:
    """Generations ``state-<gen>-v<version>-r<round>.ckpt`` in one directory, newest wins.

    ``gen`` counts saves, so ordering never depends on the version going up (a node
    that adopts an older parent model still saves a newer generation). One node per
    directory: leftover temp files from a crash are deleted when the store opens.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(_TEMP_PREFIX + "*"):
            log.info("removing unfinished checkpoint %s", leftover)
            leftover.unlink(missing_ok=True)

    def save(self, state: NodeState) -> Path:
        """Write a new generation durably, then prune to the newest ``keep``."""
        gen = max((g for g, _ in self._generations(corrupt=True)), default=0) + 1
        target = self.directory / f"state-{gen:010d}-v{state.version}-r{state.round}.ckpt"
        _write_durably(target, encode(state))
        for _, old in self._generations()[self.keep :]:
            old.unlink(missing_ok=True)
        log.debug("checkpoint %s saved", target.name)
        return target

    def published(self) -> Published:
        """The mark ``mark_published`` left; its version is at least that of every
        generation ever saved, damaged ones included (a node saves before it publishes).
        Generations without a mark are a node's from before marks: whole models."""
        saved = max((v for _, v, _ in self._files(corrupt=True)), default=-1)
        # Saved before any mark (a node from before marks): it published its model whole.
        mark = Published(whole=saved >= 0)
        path = self.directory / MARK_NAME
        if path.exists():
            try:
                doc = msgspec.msgpack.decode(path.read_bytes())
                mark = Published(int(doc["version"]), bool(doc["whole"]), int(doc["chunks"]))
            except Exception as exc:  # written by rename, so only a damaged disk gets here
                log.warning("%s is unreadable (%s): the model may be retained whole", path, exc)
                mark = Published(whole=True)
        return Published(max(mark.version, saved), mark.whole, mark.chunks)

    def mark_published(self, mark: Published) -> None:
        """Record ``mark`` durably (write, fsync, rename, fsync the directory)."""
        body = {"version": mark.version, "whole": mark.whole, "chunks": mark.chunks}
        _write_durably(self.directory / MARK_NAME, [msgspec.msgpack.encode(body)])

    def load(self) -> NodeState | None:
        """The newest generation that verifies; ``None`` if there is none.

        A damaged generation is logged once, renamed to ``*.corrupt`` (so that
        pruning never keeps it in place of a good one) and skipped.
        """
        gens = self._generations()
        for _, path in gens:
            try:
                return decode(path.read_bytes())
            except CorruptCheckpoint as exc:
                aside = path.with_name(path.name + ".corrupt")
                log.warning(
                    "checkpoint %s is damaged (%s): moved to %s, trying the previous one",
                    path,
                    exc,
                    aside.name,
                )
                os.replace(path, aside)
        if gens:
            log.error("no valid checkpoint in %s: starting from scratch", self.directory)
        return None

    def _generations(self, *, corrupt: bool = False) -> list[tuple[int, Path]]:
        """``(gen, path)`` of every generation file (and damaged ones if asked), newest first."""
        return [(gen, path) for gen, _, path in self._files(corrupt=corrupt)]

    def _files(self, *, corrupt: bool = False) -> list[tuple[int, int, Path]]:
        """``(gen, version, path)`` of every generation file, newest first."""
        found = []
        for path in self.directory.iterdir():
            m = _GENERATION.match(path.name)
            if m and (corrupt or not m.group(3)):
                found.append((int(m.group(1)), int(m.group(2)), path))
        return sorted(found, reverse=True)


def encode(state: NodeState) -> list[bytes]:
    """The file's bytes, in pieces: magic, header length, header, body.

    The header holds the format version, the body length and its sha256; the
    parameters are ``params.to_bytes``, the one persisted form of a model.
    """
    body = msgspec.msgpack.encode(
        {
            "version": state.version,
            "round": state.round,
            "parent_version": state.parent_version,
            "last_seq": dict(state.last_seq),
            "extra": state.extra,
            "saved_at": time.time(),
            "params": to_bytes(state.params),
        }
    )
    header = msgspec.msgpack.encode(
        {"format": FORMAT_VERSION, "length": len(body), "sha256": hashlib.sha256(body).digest()}
    )
    return [MAGIC, _HEADER_LEN.pack(len(header)), header, body]


def decode(data: bytes) -> NodeState:
    """Parse and verify one checkpoint file; raises ``CorruptCheckpoint``."""
    view = memoryview(data)
    prefix = len(MAGIC) + _HEADER_LEN.size
    if len(data) < prefix:
        raise CorruptCheckpoint(f"truncated: {len(data)} bytes")
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise CorruptCheckpoint("bad magic")
    (header_len,) = _HEADER_LEN.unpack(view[len(MAGIC) : prefix])
    try:
        header = msgspec.msgpack.decode(view[prefix : prefix + header_len])
        fmt, length, digest = header["format"], header["length"], header["sha256"]
    except Exception as exc:  # garbage decodes to anything, or to nothing
        raise CorruptCheckpoint(f"bad header: {type(exc).__name__}") from None
    if fmt != FORMAT_VERSION:
        raise CorruptCheckpoint(f"format {fmt!r}, expected {FORMAT_VERSION}")
    body = view[prefix + header_len :]
    if len(body) != length:
        raise CorruptCheckpoint(f"truncated: body is {len(body)} bytes, header says {length}")
    if hashlib.sha256(body).digest() != digest:
        raise CorruptCheckpoint("sha256 mismatch")
    try:
        doc = msgspec.msgpack.decode(body)
        return NodeState(
            params=from_bytes(doc["params"]),
            version=int(doc["version"]),
            round=int(doc["round"]),
            parent_version=doc["parent_version"],
            last_seq={str(k): int(v) for k, v in doc["last_seq"].items()},
            extra=dict(doc["extra"]),
        )
    except Exception as exc:  # a valid checksum over a body we cannot read
        raise CorruptCheckpoint(f"bad body: {type(exc).__name__}: {exc}") from None


def _write_durably(target: Path, pieces: list[bytes]) -> None:
    """Replace ``target`` with ``pieces`` whole or not at all, and make that durable."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not possible (nor needed) on Windows."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
