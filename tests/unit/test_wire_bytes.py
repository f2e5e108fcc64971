"""The wire's bytes do not change with the encoder behind them: one msgpack library
(msgspec) writes every message, and what it writes, signed bodies included, is what
nodes and devices already in the field sign and verify."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import msgspec
import numpy as np
import pytest

from edgefl import signing, wire
from edgefl.codecs import encode_params
from edgefl.transport import chunks
from edgefl.wire import Announcement, Delta, FTensor, Model, Reason, Rejected, TrainConfig, Update

ROOT = Path(__file__).resolve().parents[2]


def _messages() -> tuple[Announcement, Model, Delta, Update]:
    rng = np.random.default_rng(7)
    params = {"w": rng.normal(0, 1, (3, 4)).astype(np.float32), "b": np.arange(4, dtype="f4")}
    ann = Announcement(
        sender="gw-1",
        version=7,
        round=3,
        config=TrainConfig(lr=0.01, clip=1.5),
        selected=["d1", "d2"],
        deadline=12.5,
        sent_at=1.25,
        receipts={"d1": (5, 9)},
    )
    tensors = [FTensor(name=k, shape=list(v.shape), data=v.tobytes()) for k, v in params.items()]
    model = Model(sender="gw-1", version=7, tensors=tensors)
    delta = Delta(sender="gw-1", version=7, base=6, tensors=encode_params(params))
    update = Update(sender="d1", seq=4, round=3, base=6, n=32, tensors=encode_params(params))
    return ann, model, delta, update


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def test_messages_and_signed_bodies_keep_their_bytes() -> None:
    ann, model, delta, update = _messages()
    assert _digest(wire.encode_announcement(ann)) == "55125786564476e6"
    assert _digest(wire.encode_model(model)) == "d805942495fd34d8"
    assert _digest(signing.signed_body(ann)) == "79c84b312a41b07a"
    assert _digest(signing.signed_body(model)) == "8e08a29b5df00f83"
    assert _digest(signing.signed_body(delta)) == "3fca9fc0f2bda097"
    key = b"k" * 32
    assert wire.sign(update, key).sig.hex()[:16] == _SIG_OF_UPDATE


#: HMAC-SHA256 under b"k" * 32 of the update above, as the first nodes signed it.
_SIG_OF_UPDATE = "e47db3ae89fc38d8"


def test_chunks_keep_their_bytes_and_reassemble() -> None:
    payload = bytes(range(256)) * 20
    parts = chunks.split(payload, 2048)
    assert [_digest(p) for p in parts[:2]] == _CHUNK_DIGESTS
    box = chunks.Reassembler(max_payload_bytes=len(payload))
    out = [box.feed("src", p) for p in parts]
    assert out[-1] == payload and out[:-1] == [None] * (len(parts) - 1)


_CHUNK_DIGESTS = ["337ec45301f2ac69", "c74d5ef3fc8050b6"]


@pytest.mark.parametrize(
    "bomb",
    [
        b"\xdd\xff\xff\xff\xff",  # an array of 2**32 elements in five bytes
        b"\xdf\xff\xff\xff\xff",  # a map of 2**32 pairs
        b"\xc6\xff\xff\xff\xff",  # a bin of 4 GiB
        b"\x91" * 100_000 + b"\xc0",  # nested 100,000 deep
        b"\x81\xa1a\xc7\x01\x05x",  # an extension type
    ],
)
def test_hostile_msgpack_is_refused_without_allocating_what_it_claims(bomb: bytes) -> None:
    with pytest.raises(Rejected) as exc:
        wire.decode_announcement(bomb, max_bytes=1 << 20)
    assert exc.value.reason in (Reason.MALFORMED, Reason.OVERSIZED)


def test_one_msgpack_library() -> None:
    deps = re.search(r"dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S)
    assert deps is not None and '"msgpack' not in deps[1]
    for path in [*(ROOT / "edgefl").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        assert not re.search(r"^\s*import msgpack\b", path.read_text(), re.M), path
    assert msgspec.msgpack.decode(wire.pack_map({"a": b"x"})) == {"a": b"x"}
