"""Pure parts of the device: update encoding, error feedback, persisted progress and residual."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from pydantic import ValidationError

from edgefl import codecs, wire
from edgefl.codecs import decode_params
from edgefl.config import DeviceSettings
from edgefl.device import Progress, UpdateEncoder
from edgefl.device.update import float32_bytes
from edgefl.params import from_bytes, spec_of, to_bytes
from edgefl.wire import TrainConfig

KEY = "0f" * 16


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "net.0.weight": rng.normal(0, 0.01, (128, 64)).astype(np.float32),
        "net.0.bias": rng.normal(0, 0.01, (128,)).astype(np.float32),
        "net.2.weight": rng.normal(0, 0.01, (10, 128)).astype(np.float32),
    }


def _settings(**extra: object) -> DeviceSettings:
    return DeviceSettings(id="dev-1", **extra)  # type: ignore[arg-type]


def _encode(enc: UpdateEncoder, delta: dict[str, np.ndarray], seq: int = 0) -> bytes:
    tensors = enc.tensors(delta, round_=seq)
    return enc.encode(tensors, seq=seq, round_=seq, base=7, n=42, metrics={"loss": 0.5})


@pytest.mark.parametrize("codec", ["u8", "f32", "f16", "topk"])
def test_expected_update_bytes_is_within_two_percent_of_the_encoded_size(codec: str) -> None:
    delta = _delta()
    payload = _encode(UpdateEncoder(_settings(update_codec=codec, hmac_key=KEY)), delta)
    expected = codecs.update_bytes(spec_of(delta), codec, 0.1)
    assert abs(expected - len(payload)) / len(payload) < 0.02, (expected, len(payload))


def test_uint8_update_is_signed_within_half_a_step_and_four_times_smaller() -> None:
    delta = _delta()
    payload = _encode(UpdateEncoder(_settings(hmac_key=KEY)), delta)
    update = wire.decode_update(payload, spec_of(delta))
    wire.verify(update, bytes.fromhex(KEY))
    assert (update.sender, update.seq, update.base, update.n) == ("dev-1", 0, 7, 42)
    assert update.metrics == {"loss": 0.5}
    got = decode_params(update.tensors)
    for t in update.tensors:
        assert np.abs(got[t.name] - delta[t.name]).max() <= t.scale / 2 + 1e-7
    assert float32_bytes(spec_of(delta)) / len(payload) > 3.8


def test_float32_update_is_exact_and_carries_no_residual() -> None:
    delta = _delta()
    enc = UpdateEncoder(_settings(update_codec="f32"))
    update = wire.decode_update(_encode(enc, delta))
    got = decode_params(update.tensors)
    assert all(np.array_equal(got[n], delta[n]) for n in delta)
    assert all(not r.any() for r in enc.feedback.residual.values())


def test_error_feedback_sends_the_missing_part_in_the_next_round() -> None:
    enc = UpdateEncoder(_settings())
    first, second = _delta(1), _delta(2)
    sent = [decode_params(enc.tensors(d, round_=i)) for i, d in enumerate((first, second))]
    # Over two rounds the receiver got both deltas up to the residual still held back.
    for name in first:
        total = sent[0][name] + sent[1][name] + enc.feedback.residual[name]
        np.testing.assert_allclose(total, first[name] + second[name], atol=1e-6)


def test_without_error_feedback_no_residual_builds_up() -> None:
    enc = UpdateEncoder(_settings(error_feedback=False))
    enc.tensors(_delta(), round_=0)
    assert enc.feedback.residual == {}


def test_a_key_that_is_not_hex_is_refused_by_the_settings() -> None:
    with pytest.raises(ValidationError, match="hmac_key"):
        UpdateEncoder(_settings(hmac_key="not-hex"))


def test_residual_survives_packing_bit_exact() -> None:
    residual = _delta(3)
    back = from_bytes(to_bytes(residual))
    assert list(back) == list(residual)
    assert all(np.array_equal(back[n], residual[n]) and back[n].dtype == np.float32 for n in back)


def test_progress_round_trips_with_its_residual_and_starts_empty() -> None:
    assert Progress.load(None) == Progress()
    residual = _delta(4)
    back = Progress.load(Progress(trained=(4, 2), model_version=3, residual=residual).dump())
    assert (back.trained, back.model_version) == ((4, 2), 3)
    assert all(np.array_equal(back.residual[n], residual[n]) for n in residual)


def test_numpy_sample_counts_and_metrics_encode_as_plain_numbers() -> None:
    enc = UpdateEncoder(_settings())
    tensors = enc.tensors(_delta(), round_=0)
    metrics = {"loss": np.float32(0.25)}
    data = enc.encode(tensors, seq=0, round_=0, base=0, n=np.int64(42), metrics=metrics)  # type: ignore[arg-type]
    update = wire.decode_update(data, spec_of(_delta()))
    assert update.n == 42 and update.metrics == {"loss": 0.25}


def test_damaged_progress_is_refused_and_the_device_starts_afresh() -> None:
    saved = Progress(trained=(4, 2), model_version=3, residual=_delta(4)).dump()
    wrong = msgspec.msgpack.encode({"trained": "x", "residual": b"\x01"})
    for damaged in (saved[:-7], b"\x93garbage", wrong):
        assert Progress.load(damaged) == Progress()


SPEC = {"w": (1000, 100)}  # 100k values: u8 about 100 kB


@pytest.mark.parametrize(
    ("kbps", "seconds", "codec", "fraction"),
    [
        (None, 30.0, "u8", 1.0),  # no uplink figure yet: the default
        (100_000.0, 30.0, "u8", 1.0),  # ethernet: 100 kB in far less than 15 s
        (40.0, 30.0, "topk", 0.3),  # 75 kB in 15 s: topk at 0.3 is 60 kB
        (20.0, 30.0, "topk", 0.1),  # 37.5 kB: 0.2 is 40 kB, 0.1 is 20 kB
        (5.0, 30.0, "topk", 0.05),  # 9.4 kB: not even 0.05 (10 kB) fits; the policy decides
    ],
)
def test_auto_picks_the_codec_and_k_by_uplink_and_deadline(
    kbps: float | None, seconds: float, codec: str, fraction: float
) -> None:
    plan = UpdateEncoder(_settings()).choose(SPEC, TrainConfig(), kbps, seconds)
    assert (plan.codec, plan.fraction) == (codec, fraction)
    assert plan.bytes == codecs.update_bytes(SPEC, codec, fraction)


def test_the_round_config_limits_the_codecs_and_k_a_device_uses() -> None:
    only_u8 = TrainConfig(codecs=["u8"])
    assert UpdateEncoder(_settings()).choose(SPEC, only_u8, 1.0, 30.0).codec == "u8"
    fixed = UpdateEncoder(_settings(update_codec="topk", topk_fraction=0.01))
    plan = fixed.choose(SPEC, TrainConfig(min_fraction=0.1), None, None)
    assert (plan.codec, plan.fraction) == ("topk", 0.1)
    assert fixed.choose(SPEC, TrainConfig(codecs=["f32", "nope"]), None, None).codec == "f32"


def test_the_chosen_codec_is_what_the_update_carries() -> None:
    enc = UpdateEncoder(_settings())
    delta = {"w": np.random.default_rng(5).normal(size=SPEC["w"]).astype(np.float32)}
    enc.choose(SPEC, TrainConfig(), 40.0, 30.0)
    (t,) = enc.tensors(delta, round_=0)
    assert t.codec == "topk" and int.from_bytes(t.q[:4], "little") == 30_000
