from __future__ import annotations

import contextlib
import math

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl import codecs, wire
from edgefl.wire import Reason, Rejected

SPEC = {"w": (4, 3), "b": (3,)}


def _update(**overrides: object) -> wire.Update:
    rng = np.random.default_rng(0)
    delta = {n: rng.normal(size=s).astype(np.float32) for n, s in SPEC.items()}
    fields: dict[str, object] = {
        "sender": "dev-1",
        "seq": 3,
        "round": 2,
        "base": 5,
        "n": 40,
        "metrics": {"loss": 0.5},
        "tensors": codecs.encode_params(delta),
    }
    fields.update(overrides)
    return wire.Update(**fields)  # type: ignore[arg-type]


def _reason(data: bytes, spec: dict[str, tuple[int, ...]] | None = SPEC, **kw: int) -> Reason:
    with pytest.raises(Rejected) as info:
        wire.decode_update(data, spec, **kw)
    return info.value.reason


def test_update_round_trip_is_exact() -> None:
    u = _update()
    assert wire.decode_update(wire.encode_update(u), SPEC) == u


def test_update_size_is_one_byte_per_parameter_plus_headers() -> None:
    big = {"w": np.zeros((1000, 100), np.float32)}
    data = wire.encode_update(_update(tensors=codecs.encode_params(big)))
    assert 100_000 < len(data) < 100_000 + 200


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.update(v=99), Reason.MALFORMED),
        (lambda d: d.update(sender="no/slash"), Reason.MALFORMED),
        (lambda d: d.update(n=0), Reason.MALFORMED),
        (lambda d: d.update(extra_field=1), Reason.MALFORMED),
        (lambda d: d["tensors"][0].update(shape=[5, 3]), Reason.SHAPE),
        (lambda d: d["tensors"][0].update(q=b"\x00" * 5), Reason.SHAPE),
        (lambda d: d["tensors"].pop(), Reason.SHAPE),
        (lambda d: d["tensors"][0].update(name="other"), Reason.SHAPE),
        (lambda d: d["tensors"][0].update(lo=math.nan), Reason.NONFINITE),
        (lambda d: d["tensors"][1].update(scale=math.inf), Reason.NONFINITE),
    ],
)
def test_invalid_updates_are_rejected_with_their_reason(mutate: object, reason: Reason) -> None:
    doc = msgspec.msgpack.decode(wire.encode_update(_update()))
    mutate(doc)  # type: ignore[operator]
    assert _reason(msgspec.msgpack.encode(doc)) is reason


def test_invalid_utf8_in_a_string_field_is_malformed() -> None:
    assert _reason(b"\x81\xa2\x80\x80\x01") is Reason.MALFORMED  # {b"\x80\x80": 1}


def test_more_tensors_or_metrics_than_the_limits_are_malformed() -> None:
    doc = msgspec.msgpack.decode(wire.encode_update(_update()))
    many_metrics = {**doc, "metrics": {f"m{i}": 0.0 for i in range(4097)}}
    assert _reason(msgspec.msgpack.encode(many_metrics)) is Reason.MALFORMED
    many_tensors = {**doc, "tensors": doc["tensors"] * 32769}
    assert _reason(msgspec.msgpack.encode(many_tensors)) is Reason.MALFORMED


def test_oversized_payload_is_rejected_before_parsing() -> None:
    data = wire.encode_update(_update())
    assert _reason(data, max_bytes=len(data) - 1) is Reason.OVERSIZED


def test_nonfinite_float32_tensor_is_rejected() -> None:
    delta = {"w": np.zeros((4, 3), np.float32), "b": np.array([1, np.nan, 2], np.float32)}
    data = wire.encode_update(_update(tensors=codecs.encode_params(delta, "f32")))
    assert _reason(data) is Reason.NONFINITE


@given(st.binary(max_size=512))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_only_ever_raise_update_rejected(data: bytes) -> None:
    for decode in (lambda b: wire.decode_update(b, SPEC), wire.decode_model):
        with contextlib.suppress(Rejected):
            decode(data)


@given(
    st.dictionaries(
        st.text(max_size=8), st.none() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=8)
    )
)
@settings(max_examples=200, deadline=None)
def test_arbitrary_maps_only_ever_raise_update_rejected(doc: dict[str, object]) -> None:
    data = msgspec.msgpack.encode({"v": 1, **doc})
    with contextlib.suppress(Rejected):
        wire.decode_update(data, SPEC)


def test_signature_round_trip_and_tampering() -> None:
    key = b"k" * 32
    signed = wire.sign(_update(), key)
    decoded = wire.decode_update(wire.encode_update(signed), SPEC)
    wire.verify(decoded, key)
    for bad in (
        msgspec.structs.replace(decoded, n=41),
        msgspec.structs.replace(decoded, sig=b"\x00" * 32),
        msgspec.structs.replace(decoded, sig=None),
    ):
        with pytest.raises(Rejected) as info:
            wire.verify(bad, key)
        assert info.value.reason is Reason.BAD_SIGNATURE
    with pytest.raises(Rejected):
        wire.verify(decoded, b"other-key")


def test_model_round_trip_in_float32_and_float16() -> None:
    params = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)}
    for dtype, tol in (("f32", 0.0), ("f16", 1e-3)):
        model = wire.Model(sender="gw-1", version=3, tensors=wire.model_tensors(params, dtype))
        back = wire.decode_model(wire.encode_model(model))
        assert back.version == 3 and back == model
        assert np.abs(wire.model_params(back)["w"] - params["w"]).max() <= tol


def test_announcement_round_trip_keeps_every_field() -> None:
    ann = wire.Announcement(
        sender="gw-1",
        version=3,
        round=7,
        config=wire.TrainConfig(epochs=2),
        selected=["dev-1"],
        deadline=1234.5,
        sent_at=1204.5,
        receipts={"dev-1": (5, 3)},
    )
    back = wire.decode_announcement(wire.encode_announcement(ann))
    assert back == ann and back.round == 7 and back.receipts == {"dev-1": (5, 3)}


def test_a_model_with_the_old_round_fields_is_malformed() -> None:
    doc = msgspec.msgpack.decode(_model_doc([]))
    for old in ({"round": 1}, {"receipts": {}}, {"deadline": 1.0}):
        with pytest.raises(Rejected) as info:
            wire.decode_model(msgspec.msgpack.encode({**doc, **old}))
        assert info.value.reason is Reason.MALFORMED


def _model_doc(tensors: list[dict[str, object]]) -> bytes:
    return msgspec.msgpack.encode({"v": 1, "sender": "gw-1", "version": 1, "tensors": tensors})


@pytest.mark.parametrize("shape", [[-1, -4], [-2, -2], [1] * 9])
def test_a_model_tensor_shape_out_of_bounds_is_malformed(shape: list[int]) -> None:
    size = abs(math.prod(shape)) * 4
    data = _model_doc([{"name": "w", "shape": shape, "data": b"\0" * size}])
    with pytest.raises(Rejected) as info:
        wire.decode_model(data)
    assert info.value.reason is Reason.MALFORMED


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=16)
)


@given(
    shapes=st.lists(st.lists(st.integers(-(2**63), 2**64 - 1), max_size=10), max_size=3),
    widths=st.lists(st.integers(0, 64), min_size=3, max_size=3),
    extra=st.dictionaries(
        st.sampled_from(["v", "sender", "version", "sig"]),
        _SCALARS | st.lists(_SCALARS, max_size=3) | st.dictionaries(st.text(max_size=4), _SCALARS),
    ),
)
@settings(max_examples=300, deadline=None)
def test_a_model_decodes_to_usable_params_or_is_rejected(
    shapes: list[list[int]], widths: list[int], extra: dict[str, object]
) -> None:
    tensors = [
        {"name": f"t{i}", "shape": shape, "dtype": "f32", "data": b"\0" * (4 * width)}
        for i, (shape, width) in enumerate(zip(shapes, widths, strict=False))
    ]
    doc = msgspec.msgpack.decode(_model_doc(tensors))
    data = msgspec.msgpack.encode({**doc, **extra})
    try:
        model = wire.decode_model(data)
    except Rejected:
        return
    wire.model_params(model)  # the shapes it let through fit the data


def test_status_and_metrics_are_json_with_a_schema_version() -> None:
    status = wire.Status(online=True, role="device", id="dev-1", battery=0.5, buffered=2)
    raw = wire.encode_status(status)
    assert b'"schema":1' in raw
    assert wire.decode_status(raw) == status
    metrics = wire.decode_metrics(wire.encode_metrics("gateway", "gw-1", {"round": 3}))
    assert metrics["schema"] == 1 and metrics["role"] == "gateway" and metrics["round"] == 3
    with pytest.raises(Rejected):
        wire.decode_status(b"{not json")


def test_a_whole_model_in_uint8_is_a_quarter_of_float32_and_within_half_a_step() -> None:
    rng = np.random.default_rng(3)
    params = {"w": rng.normal(0, 0.3, (64, 32)).astype(np.float32), "b": np.zeros(5, "f4")}
    whole = wire.Model(sender="gw", version=2, tensors=wire.model_tensors(params))
    exact = wire.encode_model(whole)
    small = wire.Model(sender="gw", version=2, tensors=wire.model_tensors(params, "u8"))
    data = wire.encode_model(small)
    assert len(data) < 0.27 * len(exact)
    got = wire.model_params(wire.decode_model(data))
    w = params["w"]
    step = (float(w.max()) - float(w.min())) / 255
    assert float(np.abs(got["w"] - w).max()) <= step / 2 * (1 + 1e-5)
    assert got["b"].tobytes() == params["b"].tobytes()  # a constant tensor is exact


@pytest.mark.parametrize(
    ("header", "size", "reason"),
    [
        ((0.0, 1.0), 9, Reason.SHAPE),  # one value short
        ((math.nan, 1.0), 10, Reason.NONFINITE),
        ((0.0, -1.0), 10, Reason.NONFINITE),
        ((3e38, 1e37), 10, Reason.NONFINITE),  # lo + 255 scale overflows float32
    ],
)
def test_a_broken_uint8_model_tensor_is_rejected(
    header: tuple[float, float], size: int, reason: Reason
) -> None:
    data = np.array(header, "<f8").tobytes() + b"\x01" * size
    tensor = {"name": "w", "shape": [10], "dtype": "u8", "data": data}
    with pytest.raises(Rejected) as exc:
        wire.decode_model(_model_doc([tensor]))
    assert exc.value.reason is reason
