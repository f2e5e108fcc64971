from __future__ import annotations

import numpy as np
import pytest

from edgefl import codecs, fedavg
from edgefl.codecs.base import TORCH_FOLD_MIN
from edgefl.wire import QTensor


def _deltas(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "w": rng.normal(size=(8, 5)).astype(np.float32),
            "b": rng.normal(size=5).astype(np.float32),
        }
        for _ in range(count)
    ]


def test_streaming_average_equals_numpy_average() -> None:
    deltas = _deltas(50)
    weights = np.random.default_rng(1).integers(1, 500, size=50).astype(float)
    acc = fedavg.StreamingAverage()
    for d, w in zip(deltas, weights, strict=True):
        acc.add(d, w)
    result = acc.result()
    for name in ("w", "b"):
        expected = np.average(np.stack([d[name] for d in deltas]), axis=0, weights=weights)
        assert np.abs(result[name] - expected).max() < 1e-6
    assert acc.count == 50
    assert acc.total_weight == pytest.approx(weights.sum())


def test_folding_quantized_tensors_equals_averaging_their_dequantized_values() -> None:
    deltas = _deltas(10, seed=4)
    a, b = fedavg.StreamingAverage(), fedavg.StreamingAverage()
    for i, d in enumerate(deltas):
        tensors = codecs.encode_params(d)
        a.add_quantized(tensors, i + 1.0)
        b.add(codecs.decode_params(tensors), i + 1.0)
    ra, rb = a.result(), b.result()
    assert all(np.abs(ra[n] - rb[n]).max() < 1e-6 for n in ra)


@pytest.mark.parametrize("codec", ["u8", "f32", "topk"])
def test_encoded_fold_is_exact_for_large_and_small_tensors_across_blocks(codec: str) -> None:
    """Large tensors fold in torch, small ones in numpy; 70 updates cross a block flush."""
    rng = np.random.default_rng(7)
    big = (TORCH_FOLD_MIN // 64 + 1, 64)

    def encode(d: dict[str, np.ndarray]) -> list[QTensor]:
        return codecs.encode_params(d, codec, fraction=0.1)

    deltas = [
        {
            "big": rng.normal(size=big).astype(np.float32),
            "small": rng.normal(size=7).astype(np.float32),
        }
        for _ in range(fedavg.BLOCK + 6)
    ]
    weights = rng.integers(1, 100, size=len(deltas)).astype(float)
    acc = fedavg.StreamingAverage()
    for d, w in zip(deltas, weights, strict=True):
        acc.add_quantized(encode(d), w)
    result = acc.result()
    for name in ("big", "small"):
        wire = [codecs.decode_params(encode(d))[name] for d in deltas]
        expected = np.average(np.stack(wire), axis=0, weights=weights)
        assert np.abs(result[name] - expected).max() < 1e-5


def test_streaming_memory_does_not_grow_with_updates() -> None:
    acc = fedavg.StreamingAverage()
    for d in _deltas(200):
        acc.add(d, 1.0)
    held = sum(a.nbytes for a in acc._sum.values())
    assert held == (8 * 5 + 5) * 8  # one float64 slot per parameter, whatever the count


def test_empty_average_and_bad_weights_raise() -> None:
    acc = fedavg.StreamingAverage()
    with pytest.raises(ValueError, match="no updates"):
        acc.result()
    with pytest.raises(ValueError, match="positive"):
        acc.add(_deltas(1)[0], 0.0)


@pytest.mark.parametrize(
    ("kind", "s", "expected"),
    [
        ("constant", 7, 1.0),
        ("polynomial", 0, 1.0),
        ("polynomial", 3, 0.5),
        ("hinge", 4, 1.0),
        ("hinge", 6, 1 / (0.5 * 2 + 1)),
    ],
)
def test_staleness_weights(kind: fedavg.StalenessKind, s: int, expected: float) -> None:
    assert fedavg.staleness_weight(s, kind, a=0.5, b=4) == pytest.approx(expected)
