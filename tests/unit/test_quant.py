from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgefl import quant

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
tensors = arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)), elements=finite)


@given(tensors)
@settings(max_examples=200, deadline=None)
def test_deterministic_rounding_error_is_at_most_half_a_step(x: np.ndarray) -> None:
    q = quant.quantize(x)
    back = quant.dequantize(q.lo, q.scale, q.q)
    # scale/2 plus float32 rounding of the reconstruction itself.
    tolerance = q.scale / 2 + 4 * np.finfo(np.float32).eps * float(np.abs(x).max())
    assert np.abs(back - x).max() <= tolerance


@given(tensors)
@settings(max_examples=50, deadline=None)
def test_stochastic_rounding_stays_within_one_step(x: np.ndarray) -> None:
    q = quant.quantize(x, stochastic=True, rng=np.random.default_rng(1))
    back = quant.dequantize(q.lo, q.scale, q.q)
    assert np.abs(back - x).max() <= q.scale + 4 * np.finfo(np.float32).eps * float(np.abs(x).max())


def test_stochastic_rounding_is_unbiased_on_average() -> None:
    rng = np.random.default_rng(0)
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    mean = np.mean(
        [
            quant.dequantize(*_parts(quant.quantize(x, stochastic=True, rng=rng)))
            for _ in range(400)
        ],
        axis=0,
    )
    step = (x.max() - x.min()) / 255
    assert np.abs(mean - x).max() < 0.25 * step


def _parts(q: quant.Quantized) -> tuple[float, float, np.ndarray]:
    return q.lo, q.scale, q.q


def test_stochastic_rounding_is_reproducible_with_a_seed() -> None:
    x = np.random.default_rng(3).normal(size=500).astype(np.float32)
    a = quant.quantize(x, stochastic=True, rng=np.random.default_rng(7)).q
    b = quant.quantize(x, stochastic=True, rng=np.random.default_rng(7)).q
    assert np.array_equal(a, b)


def test_constant_tensor_is_exact() -> None:
    x = np.full((3, 4), 0.125, dtype=np.float32)
    q = quant.quantize(x)
    assert q.scale == 0.0
    assert np.array_equal(quant.dequantize(q.lo, q.scale, q.q), x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(bad: float) -> None:
    x = np.zeros(10, dtype=np.float32)
    x[3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        quant.quantize(x)


def test_a_range_of_denormal_steps_still_quantizes_within_half_a_step() -> None:
    x = np.array([1.1754944e-38, 0.0, 5e-39], dtype=np.float32)
    q = quant.quantize(x)
    back = quant.dequantize(q.lo, q.scale, q.q)
    assert q.q.tolist() == [255, 0, 108]
    assert np.abs(back.astype(np.float64) - x).max() <= q.scale / 2 + 1e-45


def test_a_range_below_255_denormals_uses_one_step_of_the_whole_range() -> None:
    x = np.array([[1e-45, 0.0]], dtype=np.float32)
    q = quant.quantize(x)
    assert q.q.tolist() == [[1, 0]]
    assert np.array_equal(quant.dequantize(q.lo, q.scale, q.q), x)
