"""The update codecs and their registry: round trips, exact sizes, error feedback, and
every malformed payload an untrusted sender may craft refused with a reason."""

from __future__ import annotations

import math
import struct

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl import codecs
from edgefl.aggregator.admission import UpdateGate
from edgefl.aggregator.fold import Contribution, RoundFold
from edgefl.codecs import topk
from edgefl.config import DeviceSettings
from edgefl.device import UpdateEncoder
from edgefl.errors import Reason, Rejected
from edgefl.params import spec_of
from edgefl.wire import QTensor, TrainConfig, Update, decode_update, encode_update

BUILT_IN = ("u8", "topk", "f32", "f16")


def _x(n: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, n).astype(np.float32)


def _topk(k: int, values: bytes, gaps: list[int], shape: list[int]) -> QTensor:
    q = struct.pack("<I", k) + values + topk.pack_varints(np.array(gaps, np.uint64))
    return QTensor(name="w", shape=shape, lo=0.0, scale=0.01, q=q, codec="topk")


def _reason(t: QTensor) -> Reason:
    with pytest.raises(Rejected) as exc:
        codecs.get(t.codec).check(t)
    return exc.value.reason


def test_the_built_in_codecs_are_registered_and_an_unknown_name_is_rejected() -> None:
    assert set(BUILT_IN) <= set(codecs.names())
    with pytest.raises(Rejected) as exc:
        codecs.get("zip")
    assert exc.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(("codec", "width"), [("u8", 1), ("f32", 4), ("f16", 2)])
def test_dense_codecs_round_trip_within_their_step_in_exactly_width_bytes_a_value(
    codec: str, width: int
) -> None:
    x = _x().reshape(10, 100)
    (t,) = codecs.encode_params({"w": x}, codec)
    codecs.get(codec).check(t)
    assert len(t.q) == width * x.size
    err = np.abs(codecs.decode_params([t])["w"] - x).max()
    bound = {"u8": t.scale / 2 + 1e-7, "f32": 0.0, "f16": 1e-3 * np.abs(x).max()}[codec]
    assert err <= bound


def test_topk_keeps_the_largest_values_within_half_a_step_and_zeroes_the_rest() -> None:
    x = _x(1000)
    (t,) = codecs.encode_params({"w": x}, "topk", fraction=0.1)
    got = codecs.decode_params([t])["w"]
    kept = np.flatnonzero(got)
    assert len(kept) == 100 and set(kept) == set(np.argsort(-np.abs(x))[:100])
    assert np.abs(got[kept] - x[kept]).max() <= t.scale / 2 + 1e-7
    assert codecs.get("topk").values(t) == 100


def test_topk_size_is_four_bytes_plus_one_byte_a_value_plus_each_gaps_varint() -> None:
    x = np.zeros(100_000, np.float32)
    positions = [3, 10, 200, 70_000]  # gaps 3, 6, 189 (2 bytes), 69_799 (3 bytes)
    x[positions] = [1.0, -2.0, 3.0, 4.0]
    (t,) = codecs.encode_params({"w": x}, "topk", fraction=4 / x.size)
    assert len(t.q) == 4 + 4 + (1 + 1 + 2 + 3)
    assert np.flatnonzero(codecs.decode_params([t])["w"]).tolist() == positions


def test_topk_at_a_tenth_is_twenty_times_smaller_than_float32() -> None:
    x = _x(100_000)
    (t,) = codecs.encode_params({"w": x}, "topk", fraction=0.1)
    assert len(t.q) == 4 + 10_000 * 2  # random positions: every gap under 128 here
    assert 4 * x.size / len(t.q) > 19.9
    assert codecs.get("topk").payload_bytes(x.size, 0.1) == len(t.q)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**42 - 1), max_size=50))
def test_varints_round_trip(values: list[int]) -> None:
    data = topk.pack_varints(np.array(values, np.uint64))
    assert topk.unpack_varints(data, len(values), "w").tolist() == values


@pytest.mark.parametrize(
    ("t", "reason"),
    [
        (QTensor(name="w", shape=[10], lo=0, scale=1, q=b"\x01", codec="topk"), Reason.MALFORMED),
        (_topk(11, bytes(11), [0] * 11, [10]), Reason.SHAPE),  # k above the size
        (_topk(0, b"", [], [10]), Reason.SHAPE),  # nothing kept of a non-empty tensor
        (_topk(2, bytes(2), [0], [10]), Reason.SHAPE),  # one gap short: too few bytes
        (_topk(2, bytes(2), [0, 0, 0], [10]), Reason.MALFORMED),  # a gap too many
        (_topk(2, bytes(2), [3, 6], [10]), Reason.SHAPE),  # index 10 of 10 values
        (_topk(2, bytes(2), [2**41, 2**41], [10]), Reason.SHAPE),  # far beyond
    ],
)
def test_every_malformed_topk_payload_is_rejected(t: QTensor, reason: Reason) -> None:
    assert _reason(t) is reason


def test_topk_rejects_gaps_not_in_their_shortest_form_or_longer_than_six_bytes() -> None:
    long = struct.pack("<I", 1) + b"\x00" + b"\x81\x80\x00"  # 1 in three bytes
    t = QTensor(name="w", shape=[10], lo=0, scale=1, q=long, codec="topk")
    assert _reason(t) is Reason.MALFORMED
    wide = struct.pack("<I", 2) + b"\x00\x00" + b"\x80" * 6 + b"\x01" + b"\x00"
    t = QTensor(name="w", shape=[2**40], lo=0, scale=1, q=wide, codec="topk")
    assert _reason(t) is Reason.MALFORMED


def test_topk_indices_are_strictly_increasing_so_a_duplicate_cannot_be_sent() -> None:
    # Gaps count the values skipped: no encoding of an index twice exists; a wrap of
    # the 64-bit sum (the only way back) shows as a step down and is refused.
    t = _topk(3, bytes(3), [5, 2**42 - 1, 2**42 - 1], [2**40])
    assert _reason(t) is Reason.SHAPE


@pytest.mark.parametrize("codec", BUILT_IN)
def test_values_that_overflow_float32_are_nonfinite(codec: str) -> None:
    (t,) = codecs.encode_params({"w": _x(10)}, codec, fraction=0.5)
    bad = msgspec.structs.replace(t, lo=3e38, scale=1e37)
    if codec in ("f32", "f16"):
        raw = np.full(10, np.inf, "<f4" if codec == "f32" else "<f2").tobytes()
        bad = msgspec.structs.replace(t, q=raw)
    assert _reason(bad) is Reason.NONFINITE


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(BUILT_IN),
    st.lists(st.integers(0, 20), min_size=1, max_size=2),
    st.binary(max_size=64),
    st.floats(allow_nan=True),
    st.floats(allow_nan=True),
)
def test_arbitrary_bytes_are_rejected_or_decode_to_finite_values_of_their_shape(
    codec: str, shape: list[int], q: bytes, lo: float, scale: float
) -> None:
    t = QTensor(name="w", shape=shape, lo=lo, scale=scale, q=q, codec=codec)
    c = codecs.get(codec)
    try:
        c.check(t)
    except Rejected:
        return
    x = c.decode(t)
    assert x.shape == tuple(shape) and np.isfinite(x).all()
    assert math.isfinite(c.squared_norm(t))


@pytest.mark.parametrize("codec", BUILT_IN)
def test_error_feedback_carries_exactly_what_was_not_sent(codec: str) -> None:
    feedback = codecs.ErrorFeedback()
    deltas = [_x(2000, seed) for seed in range(30)]
    sent_total = np.zeros(2000, np.float32)
    for d in deltas:
        before = feedback.compensate({"w": d})["w"]
        sent = codecs.decode_params(feedback.encode({"w": d}, codec, fraction=0.1))["w"]
        np.testing.assert_array_equal(feedback.residual["w"], (before - sent).astype(np.float32))
        sent_total += sent
    # What was sent over the rounds is the sum of the deltas but for the last residual.
    np.testing.assert_allclose(
        sent_total + feedback.residual["w"], np.sum(deltas, axis=0), atol=2e-5
    )
    gap = np.linalg.norm(sent_total - np.sum(deltas, axis=0)) / np.linalg.norm(np.sum(deltas, 0))
    assert gap < (0.35 if codec == "topk" else 0.01)


def test_a_user_codec_loaded_from_module_attribute_goes_from_device_to_fold() -> None:
    settings_ = DeviceSettings(id="dev-1", update_codec="codec_plugin:Int8")  # type: ignore[call-arg]
    assert settings_.update_codec == "i8" and codecs.load_codec("i8").name == "i8"
    delta = {"w": _x(300).reshape(3, 100), "b": _x(3, seed=1)}
    enc = UpdateEncoder(settings_)
    payload = enc.encode(enc.tensors(delta, 0), seq=0, round_=0, base=0, n=10, metrics={})
    gate = UpdateGate(spec_of(delta), max_bytes=1 << 20, max_staleness=2, allowed_codecs=["i8"])
    fold = RoundFold()
    admitted = gate.admit(payload, "dev-1", 0, measure=fold.measure)
    assert [t.codec for t in admitted.update.tensors] == ["i8", "i8"]

    fold.add(Contribution("dev-1", admitted.update.tensors, 10.0, admitted.norm))
    result, _ = fold.result()
    for n in delta:
        assert np.abs(result[n] - delta[n]).max() <= np.abs(delta[n]).max() / 254 + 1e-7


def test_a_node_refuses_codecs_its_round_config_does_not_allow_and_too_small_a_k() -> None:
    delta = {"w": _x(1000)}

    def payload(codec: str, fraction: float) -> bytes:
        tensors = codecs.encode_params(delta, codec, fraction=fraction)
        seq = round(fraction * 100)
        return encode_update(Update(sender="d", seq=seq, round=0, base=0, n=1, tensors=tensors))

    gate = UpdateGate(
        spec_of(delta),
        max_bytes=1 << 20,
        max_staleness=2,
        allowed_codecs=["topk"],
        min_fraction=0.1,
    )
    for data, reason in (
        (payload("f32", 1.0), Reason.MALFORMED),
        (payload("topk", 0.05), Reason.SHAPE),
    ):
        with pytest.raises(Rejected) as exc:
            gate.admit(data, "d", 0)
        assert exc.value.reason is reason
    assert gate.admit(payload("topk", 0.1), "d", 0).update.tensors[0].codec == "topk"


def test_decode_update_checks_each_tensor_through_its_codec() -> None:
    t = _topk(2, bytes(2), [3, 6], [10])
    data = encode_update(Update(sender="d", seq=0, round=0, base=0, n=1, tensors=[t]))
    with pytest.raises(Rejected) as exc:
        decode_update(data)
    assert exc.value.reason is Reason.SHAPE


def test_a_registered_name_cannot_be_taken_by_another_codec() -> None:
    with pytest.raises(codecs.CodecError):
        codecs.register(codecs.dense.Dense("u8", "<f4"))
    with pytest.raises(codecs.CodecError):
        codecs.load_codec("codec_plugin:Nope")
    assert TrainConfig().codecs == list(BUILT_IN)
