"""Robust aggregation: the share cap, adaptive clipping, the robust rules and the round fold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl import fedavg, robust
from edgefl.aggregator.fold import MIN_NORMS, Contribution, RoundFold
from edgefl.codecs import encode_params


def _capped(weights: list[float], share: float) -> list[float]:
    cap = robust.share_cap(weights, share)
    return [min(w, cap) for w in weights]


def test_share_cap_keeps_every_child_under_its_share() -> None:
    capped = _capped([1e12, 100, 100, 100, 100], 0.25)
    assert capped[0] == pytest.approx(400 / 3) and capped[1:] == [100] * 4
    assert _capped([10, 10, 10, 10], 0.25) == [10] * 4  # nothing binds
    assert _capped([9, 1, 1], 0.25) == [1, 1, 1]  # too few children: equal weights
    assert robust.share_cap([5.0], 1.0) == math.inf


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(1.0, 1e12), min_size=4, max_size=40),
    st.floats(0.05, 0.9),
    st.floats(1.0, 1e12),
)
def test_share_cap_holds_and_never_falls_as_children_are_added(
    weights: list[float], share: float, extra: float
) -> None:
    if len(weights) * share < 1:
        return
    capped = _capped(weights, share)
    assert max(capped) <= share * sum(capped) * (1 + 1e-9)
    # A weight under the cap stays under it when another child joins.
    later = robust.share_cap([*weights, extra], share)
    assert all(c <= later * (1 + 1e-9) for c in capped)


def test_clip_bound_is_a_multiple_of_the_median_norm() -> None:
    window = robust.NormWindow(size=5, norms=[1.0, 2.0, 3.0, 1000.0])
    assert window.bound(2.0) == pytest.approx(5.0)
    assert robust.clip_scale(10.0, 5.0) == 0.5 and robust.clip_scale(1.0, 5.0) == 1.0
    window.add(float("nan"))  # never enters
    assert len(window) == 4


def test_median_trimmed_mean_and_krum_ignore_an_outlier() -> None:
    honest = [{"w": np.full(3, v, np.float32)} for v in (1.0, 1.1, 0.9, 1.05, 0.95)]
    poisoned = [*honest, {"w": np.full(3, 1e6, np.float32)}]
    plain = fedavg.weighted_average([(d, 1.0) for d in poisoned])["w"]
    assert plain[0] > 1e5
    for got in (
        robust.coordinate_median(poisoned)["w"],
        robust.trimmed_mean(poisoned, 0.2)["w"],
        robust.multi_krum(poisoned, byzantine=1)["w"],
    ):
        assert np.all(np.abs(got - 1.0) < 0.1)


def _fold_all(fold: RoundFold, deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        tensors = encode_params({"w": d})
        fold.add(Contribution(f"c{i}", tensors, w, fold.measure(tensors)))
    return fold.result()[0]["w"]


def test_round_fold_clips_a_scaled_update_and_caps_an_inflated_weight() -> None:
    rng = np.random.default_rng(0)
    honest = [rng.normal(0, 0.1, 1000).astype(np.float32) for _ in range(6)]
    evil = (-1e4 * honest[0]).astype(np.float32)
    fold = RoundFold(max_share=0.25, clip_factor=2.0)
    got = _fold_all(fold, [*honest, evil], [10.0] * 6 + [1e12])
    mean = np.mean(honest, axis=0)
    assert fold.clipped == 1
    # The attacker keeps a quarter of the weight and twice the median norm at most.
    assert (
        np.linalg.norm(got - mean)
        <= 0.25 * (2 * np.linalg.norm(honest[0]) + np.linalg.norm(mean)) + 0.05
    )


def test_round_fold_holds_few_updates_whatever_the_round_size() -> None:
    rng = np.random.default_rng(1)
    fold = RoundFold(max_share=0.25, clip_factor=2.0)
    held = []
    for i in range(200):
        tensors = encode_params({"w": rng.normal(0, 0.1, 64).astype(np.float32)})
        fold.add(Contribution(f"c{i}", tensors, float(rng.integers(5, 50)), fold.measure(tensors)))
        held.append(fold.held)
    assert max(held) <= max(MIN_NORMS, 4) + 2 and held[-1] <= 2


def test_round_fold_matches_plain_fedavg_when_no_rule_binds() -> None:
    rng = np.random.default_rng(2)
    deltas = [rng.normal(0, 0.1, 20_000).astype(np.float32) for _ in range(8)]
    weights = [float(w) for w in rng.integers(10, 20, 8)]
    fold = RoundFold(max_share=1.0, clip_factor=0.0)
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        tensors = encode_params({"w": d}, "f32")
        fold.add(Contribution(f"c{i}", tensors, w, fold.measure(tensors)))
    got = fold.result()[0]["w"]
    np.testing.assert_allclose(got, np.average(deltas, axis=0, weights=weights), atol=1e-5)
