"""Robust aggregation: weight caps, adaptive norm clipping and Byzantine-tolerant rules.

Pure numpy over ``(delta, weight)`` pairs and plain numbers, like ``fedavg``;
never imports asyncio or MQTT. The aggregator's round fold applies these.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from .params import Params

#: Aggregation rules: norm-bounded FedAvg (streaming), and the robust ones below.
Rule = Literal["fedavg", "median", "trimmed_mean", "krum"]


def share_cap(weights: Sequence[float], max_share: float) -> float:
    """The largest weight ``c`` any one child may keep so that none holds more than
    ``max_share`` of the capped total: ``c = max_share * sum(min(w, c))``.

    With fewer than ``1 / max_share`` children no cap can satisfy that; every child
    then gets the smallest weight (equal weights). ``inf`` when nothing binds. The
    cap never falls as children are added, so a weight under it stays under it.
    """
    if not weights:
        return math.inf
    if max_share >= 1.0:
        return math.inf
    ws = sorted(weights, reverse=True)
    if len(ws) * max_share < 1.0 - 1e-12:
        return ws[-1]
    # rests[j]: the sum of all but the j largest, summed from the small end (exact enough
    # next to a forged 1e12). Capping the j largest at c: c = s * (j*c + rests[j]).
    rests = [0.0] * (len(ws) + 1)
    for j in range(len(ws) - 1, -1, -1):
        rests[j] = rests[j + 1] + ws[j]
    for j in range(len(ws)):
        if max_share * j >= 1.0:
            break
        c = max_share * rests[j] / (1.0 - max_share * j)
        if c >= ws[j]:
            return math.inf if j == 0 else c
    return ws[-1]


def clip_scale(norm: float, bound: float) -> float:
    """The factor that scales a delta of ``norm`` down to at most ``bound`` (1 if within)."""
    return 1.0 if norm <= bound or bound <= 0 else bound / norm


class NormWindow:
    """The L2 norms of recently accepted updates; the adaptive clip bound is a multiple
    of their median, so a minority of huge (or tiny) updates cannot move it."""

    def __init__(self, size: int = 64, norms: Iterable[float] = ()) -> None:
        self._norms: deque[float] = deque((float(n) for n in norms), maxlen=size)

    def __len__(self) -> int:
        return len(self._norms)

    def add(self, norm: float) -> None:
        if math.isfinite(norm):
            self._norms.append(norm)

    def bound(self, factor: float, extra: Iterable[float] = ()) -> float:
        """``factor * median`` of the window and ``extra`` (inf when there is nothing)."""
        values = [*self._norms, *extra]
        return factor * float(np.median(values)) if values else math.inf

    def values(self) -> list[float]:
        return list(self._norms)


def _stack(deltas: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([d[name] for d in deltas]).astype(np.float32)


def coordinate_median(deltas: Sequence[Mapping[str, np.ndarray]]) -> Params:
    """Coordinate-wise median of the deltas."""
    return {n: np.median(_stack(deltas, n), axis=0).astype(np.float32) for n in deltas[0]}


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim: float) -> Params:
    """Coordinate-wise mean after dropping the ``trim`` fraction at each end."""
    k = math.floor(trim * len(deltas))
    out: Params = {}
    for n in deltas[0]:
        s = np.sort(_stack(deltas, n), axis=0)
        out[n] = s[k : len(deltas) - k].mean(axis=0).astype(np.float32)
    return out


def multi_krum(
    deltas: Sequence[Mapping[str, np.ndarray]], byzantine: int, keep: int | None = None
) -> Params:
    """Multi-Krum (Blanchard et al., 2017): average the ``keep`` deltas whose summed squared
    distance to their ``n - byzantine - 2`` nearest neighbours is smallest.

    ``keep`` defaults to ``n - byzantine``; with too few deltas to tell (``n <= 2f + 2``)
    the neighbourhood shrinks to at least one. O(n^2 x model) time, O(n x model) memory.
    """
    n = len(deltas)
    flat = np.stack(
        [np.concatenate([np.ravel(d[k]) for k in deltas[0]]).astype(np.float64) for d in deltas]
    )
    sq = np.einsum("ij,ij->i", flat, flat)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    neighbours = max(1, n - byzantine - 2)
    scores = np.array(
        [np.sort(np.delete(dist[i], i))[:neighbours].sum() if n > 1 else 0.0 for i in range(n)]
    )
    chosen = np.argsort(scores, kind="stable")[: max(1, keep if keep else n - byzantine)]
    return {
        k: np.mean([deltas[i][k] for i in chosen], axis=0).astype(np.float32) for k in deltas[0]
    }
