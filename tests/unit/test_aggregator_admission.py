"""Admission of updates: every rejection reason, its order, and staleness weights."""

from __future__ import annotations

import math

import msgpack
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.aggregator.admission import UpdateGate, dequantized_finite, squared_norm
from edgefl.fedavg import staleness_weight
from edgefl.params import l2_norm
from edgefl.quant import dequantize_params, float_params, quantize_params
from edgefl.wire import QTensor, Reason, Update, UpdateRejected, encode_update, sign

SPEC = {"w": (2, 3)}
KEY = bytes(range(16))


def _update(sender: str = "d1", seq: int = 0, base: int = 3, value: float = 0.1, **kw: object):
    delta = {"w": np.full((2, 3), value, np.float32)}
    return Update(
        sender=sender, seq=seq, round=0, base=base, n=5, tensors=float_params(delta), **kw
    )


def _gate(**kw: object) -> UpdateGate:
    options: dict[str, object] = {"max_bytes": 4096, "max_staleness": 2}
    options.update(kw)
    return UpdateGate(SPEC, **options)  # type: ignore[arg-type]


def _reason(gate: UpdateGate, payload: bytes, sender: str = "d1", version: int = 3) -> Reason:
    with pytest.raises(UpdateRejected) as info:
        gate.admit(payload, sender, version)
    return info.value.reason


def test_valid_update_is_admitted_with_its_staleness_weight() -> None:
    gate = _gate(staleness="polynomial", staleness_a=0.5)
    ok = gate.admit(encode_update(_update(base=1)), "d1", 3)
    assert ok.staleness == 2
    assert ok.weight == pytest.approx(5 * staleness_weight(2, "polynomial", 0.5))
    assert gate.last_seq == {"d1": 0}


def test_every_reason_is_raised_by_its_own_check() -> None:
    gate = _gate(keys={"signed": KEY}, max_norm=1.0, allowed=None)
    good = encode_update(_update())
    assert _reason(gate, b"\x00garbage") is Reason.MALFORMED
    assert _reason(gate, good + b"\x00" * 5000) is Reason.OVERSIZED
    wrong = msgspec.structs.replace(_update(), tensors=float_params({"w": np.zeros(6)}))
    assert _reason(gate, encode_update(wrong)) is Reason.SHAPE
    nan = msgpack.unpackb(encode_update(_update()))
    nan["tensors"][0].update(dtype="u8", q=bytes(6), lo=float("nan"))
    assert _reason(gate, msgpack.packb(nan)) is Reason.NONFINITE
    assert _reason(gate, good, sender="d2") is Reason.UNKNOWN_SENDER  # topic != payload
    gate.admit(good, "d1", 3)
    assert _reason(gate, good) is Reason.DUPLICATE
    assert _reason(gate, encode_update(_update(seq=1, base=0))) is Reason.STALE
    assert _reason(gate, encode_update(_update(seq=1, base=4))) is Reason.STALE  # unknown base
    forged = sign(_update("signed"), b"wrong key")
    assert _reason(gate, encode_update(forged), sender="signed") is Reason.BAD_SIGNATURE
    assert _reason(gate, encode_update(_update("signed")), sender="signed") is Reason.BAD_SIGNATURE
    assert _reason(gate, encode_update(_update(seq=2, value=1.0))) is Reason.NORM
    gate.admit(encode_update(sign(_update("signed"), KEY)), "signed", 3)
    assert gate.last_seq == {"d1": 0, "signed": 0}  # rejections never move last_seq


def test_unknown_senders_by_allow_list_or_missing_status() -> None:
    payload = encode_update(_update())
    assert _reason(_gate(allowed=frozenset({"d9"})), payload) is Reason.UNKNOWN_SENDER
    with pytest.raises(UpdateRejected):
        _gate().admit(payload, "d1", 3, known=lambda s: s == "d9")
    assert _gate().admit(payload, "d1", 3, known=lambda s: s == "d1").update.sender == "d1"


def test_required_signature_rejects_unsigned_updates_without_a_key() -> None:
    gate = _gate(require_signature=True)
    assert _reason(gate, encode_update(_update())) is Reason.BAD_SIGNATURE
    star = _gate(keys={"*": KEY}, require_signature=True)
    assert star.admit(encode_update(sign(_update(), KEY)), "d1", 3).staleness == 0


def test_quantized_values_that_overflow_float32_are_nonfinite() -> None:
    huge = QTensor(name="w", shape=[2, 3], lo=3e38, scale=1e37, q=bytes([255] * 6))
    assert not dequantized_finite([huge])
    update = msgspec.structs.replace(_update(), tensors=[huge])
    assert _reason(_gate(), encode_update(update)) is Reason.NONFINITE


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=64),
    st.booleans(),
)
def test_update_norm_matches_the_norm_of_the_dequantized_delta(
    values: list[float], f32: bool
) -> None:
    delta = {"v": np.array(values, np.float32)}
    tensors = float_params(delta) if f32 else quantize_params(delta)
    expected = l2_norm(dequantize_params(tensors))
    assert math.sqrt(squared_norm(tensors)) == pytest.approx(expected, rel=1e-5, abs=1e-4)
