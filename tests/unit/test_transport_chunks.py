"""Chunking: payloads over a broker's packet limit, split and rebuilt in bounded memory."""

from __future__ import annotations

import hashlib

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.transport.chunks import Reassembler, chunk_source, chunk_topic, split
from edgefl.wire import Reason, Rejected


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def test_small_payload_travels_whole() -> None:
    data = _payload(1000)
    assert split(data, 4096) == [data]
    assert Reassembler().feed("a", data) == data


@given(
    size=st.integers(5000, 40_000),
    limit=st.integers(1300, 4900),
    order=st.randoms(use_true_random=False),
)
@settings(max_examples=60, deadline=None)
def test_split_and_reassemble_round_trip_in_any_order(size: int, limit: int, order: object) -> None:
    data = _payload(size)
    chunks = split(data, limit)
    assert len(chunks) > 1 and all(len(c) <= limit for c in chunks)
    order.shuffle(chunks)  # type: ignore[attr-defined]
    chunks.insert(1, chunks[0])  # a duplicate delivery
    r = Reassembler()
    out = [whole for c in chunks if (whole := r.feed("src", c)) is not None]
    assert out == [data]
    assert len(r) == 0 and r.pending_bytes == 0


def test_a_lost_chunk_expires_and_is_counted() -> None:
    clock = FakeClock()
    r = Reassembler(timeout_s=10, clock=clock)
    chunks = split(_payload(20_000), 4096)
    for c in chunks[:-1]:
        assert r.feed("src", c) is None
    clock.now = 11
    assert r.expire() == 1
    assert r.expired == 1 and len(r) == 0 and r.pending_bytes == 0
    assert r.feed("src", chunks[-1]) is None  # the straggler starts a new set, never completes


def test_a_corrupted_chunk_fails_the_digest() -> None:
    chunks = split(_payload(20_000), 4096)
    doc = msgspec.msgpack.decode(chunks[2])
    doc["part"] = bytes(len(doc["part"]))
    chunks[2] = msgspec.msgpack.encode(doc)
    r = Reassembler()
    with pytest.raises(Rejected) as info:
        for c in chunks:
            r.feed("src", c)
    assert info.value.reason is Reason.MALFORMED
    assert r.pending_bytes == 0


def test_pending_memory_is_bounded() -> None:
    r = Reassembler(max_pending_bytes=30_000, max_sets=4)
    for seed in range(10):  # ten incomplete sets of ~16 KB each
        chunks = split(_payload(20_000, seed), 4096)
        for c in chunks[:4]:
            r.feed(f"src{seed}", c)
        assert r.pending_bytes <= 30_000 and len(r) <= 4
    assert r.evicted > 0


def test_sets_from_different_sources_do_not_mix() -> None:
    a, b = _payload(9000, 1), _payload(9000, 2)
    ca, cb = split(a, 4096, chunk_id="same"), split(b, 4096, chunk_id="same")
    r = Reassembler()
    got = [r.feed("x", ca[0]), r.feed("y", cb[0])]
    got += [r.feed("x", c) for c in ca[1:]] + [r.feed("y", c) for c in cb[1:]]
    assert [g for g in got if g is not None] == [a, b]
    assert hashlib.sha256(a).digest() != hashlib.sha256(b).digest()


def test_a_retained_chunk_topic_names_its_source() -> None:
    assert chunk_topic("edgefl/gw-1/model", 3) == "edgefl/gw-1/model/chunk/3"
    assert chunk_source("edgefl/gw-1/model/chunk/3") == "edgefl/gw-1/model"
    assert chunk_source("edgefl/gw-1/model") == "edgefl/gw-1/model"
    assert chunk_source("edgefl/gw-1/chunk/x") == "edgefl/gw-1/chunk/x"
