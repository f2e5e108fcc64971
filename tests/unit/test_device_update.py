"""Pure parts of the device: update encoding, error feedback, persisted progress and residual."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl import wire
from edgefl.config import ConfigError, DeviceSettings
from edgefl.device import Progress, UpdateEncoder, expected_update_bytes, pack_params, unpack_params
from edgefl.device.update import float32_bytes
from edgefl.params import spec_of
from edgefl.quant import dequantize_params

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


@pytest.mark.parametrize("dtype", ["u8", "f32"])
def test_expected_update_bytes_is_within_two_percent_of_the_encoded_size(dtype: str) -> None:
    delta = _delta()
    payload = _encode(UpdateEncoder(_settings(update_dtype=dtype, hmac_key=KEY)), delta)
    expected = expected_update_bytes(spec_of(delta), dtype)
    assert abs(expected - len(payload)) / len(payload) < 0.02, (expected, len(payload))


def test_uint8_update_is_signed_within_half_a_step_and_four_times_smaller() -> None:
    delta = _delta()
    payload = _encode(UpdateEncoder(_settings(hmac_key=KEY)), delta)
    update = wire.decode_update(payload, spec_of(delta))
    wire.verify(update, bytes.fromhex(KEY))
    assert (update.sender, update.seq, update.base, update.n) == ("dev-1", 0, 7, 42)
    assert update.metrics == {"loss": 0.5}
    got = dequantize_params(update.tensors)
    for t in update.tensors:
        assert np.abs(got[t.name] - delta[t.name]).max() <= t.scale / 2 + 1e-7
    assert float32_bytes(spec_of(delta)) / len(payload) > 3.8


def test_float32_update_is_exact_and_carries_no_residual() -> None:
    delta = _delta()
    enc = UpdateEncoder(_settings(update_dtype="f32"))
    update = wire.decode_update(_encode(enc, delta))
    got = dequantize_params(update.tensors)
    assert all(np.array_equal(got[n], delta[n]) for n in delta)
    assert enc.error_feedback is False and enc.feedback.residual == {}


def test_error_feedback_sends_the_missing_part_in_the_next_round() -> None:
    enc = UpdateEncoder(_settings())
    first, second = _delta(1), _delta(2)
    sent = [dequantize_params(enc.tensors(d, round_=i)) for i, d in enumerate((first, second))]
    # Over two rounds the receiver got both deltas up to the residual still held back.
    for name in first:
        total = sent[0][name] + sent[1][name] + enc.feedback.residual[name]
        np.testing.assert_allclose(total, first[name] + second[name], atol=1e-6)


def test_without_error_feedback_no_residual_builds_up() -> None:
    enc = UpdateEncoder(_settings(error_feedback=False))
    enc.tensors(_delta(), round_=0)
    assert enc.feedback.residual == {}


def test_a_key_that_is_not_hex_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="hmac_key"):
        UpdateEncoder(_settings(hmac_key="not-hex"))


def test_residual_survives_packing_bit_exact() -> None:
    residual = _delta(3)
    back = unpack_params(pack_params(residual))
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
