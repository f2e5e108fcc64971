"""Splitting a labelled data set: the held-out split, then over devices IID, Dirichlet, shards.

Pure functions of (labels, shard count, settings, seed): every sample lands in
exactly one shard, no shard is empty, and the same seed gives the same split.
They never look at the inputs, only at the labels.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

#: How often the Dirichlet split is drawn again before small shards are topped up.
DIRICHLET_REDRAWS = 100


def split_holdout(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, test)`` row indices, stratified: each label keeps its share in both.

    The test set has ``ceil(test_fraction * n)`` rows, dealt to the labels by
    largest remainder, drawn at random within each label.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    n_test = math.ceil(test_fraction * len(labels))
    exact = counts * (n_test / len(labels))
    take = np.floor(exact).astype(np.int64)
    short = n_test - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    held = np.sort(
        np.concatenate([rng.permutation(m)[:k] for m, k in zip(by_class, take, strict=True)])
    )
    return np.setdiff1d(np.arange(len(labels)), held), held


def partition_iid(labels: np.ndarray, num_shards: int, seed: int) -> list[np.ndarray]:
    """Shuffle and cut into ``num_shards`` shards whose sizes differ by at most one."""
    n = _check(labels, num_shards, 1)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_shards)]


def partition_dirichlet(
    labels: np.ndarray, num_shards: int, alpha: float, seed: int, *, min_size: int = 2
) -> list[np.ndarray]:
    """Per class, share its samples over shards in Dirichlet(``alpha``) proportions.

    Small ``alpha`` gives each shard a few dominant classes. The split is drawn
    again while some shard has fewer than ``min_size`` samples; if that keeps
    happening (many shards, few samples), the largest shards give random
    samples to the small ones until each holds ``min_size``.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    n = _check(labels, num_shards, min_size)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    shards: list[list[int]] = []
    for _ in range(DIRICHLET_REDRAWS):
        shards = [[] for _ in range(num_shards)]
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_shards, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for shard, part in zip(shards, np.split(members, cuts), strict=True):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            break
    else:
        log.debug("dirichlet split of %d samples over %d shards topped up", n, num_shards)
        _top_up(shards, min_size, rng)
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def partition_shards(
    labels: np.ndarray, num_shards: int, shards_per_device: int, seed: int
) -> list[np.ndarray]:
    """Sort by label, cut into ``num_shards * shards_per_device`` pieces, deal them out.

    Each device sees about ``shards_per_device`` classes (the FedAvg paper's
    pathological non-IID split).
    """
    if shards_per_device < 1:
        raise ValueError(f"shards_per_device must be >= 1, got {shards_per_device}")
    n = _check(labels, num_shards * shards_per_device, 1)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n)
    # stable sort of a shuffled order: sorted by label, random within a label
    by_label = shuffled[np.argsort(np.asarray(labels)[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_shards * shards_per_device)
    deal = rng.permutation(len(pieces)).reshape(num_shards, shards_per_device)
    return [np.sort(np.concatenate([pieces[i] for i in row])) for row in deal]


def _check(labels: np.ndarray, num_shards: int, per_shard: int) -> int:
    n = len(labels)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if n < num_shards * per_shard:
        raise ValueError(
            f"{n} samples cannot fill {num_shards} shards with at least {per_shard} each"
        )
    return n


def _top_up(shards: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    for small in shards:
        while len(small) < min_size:
            donor = max(shards, key=len)
            small.append(donor.pop(int(rng.integers(len(donor)))))
