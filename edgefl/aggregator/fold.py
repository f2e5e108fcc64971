"""One round's aggregate under the safety rules: capped weights, clipped deltas, finite result.

FedAvg folds an update as soon as neither rule can change its coefficient any more
(O(model) memory, plus the few updates still held); the robust rules hold one
update per child until the close. Pure: no asyncio, no MQTT, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import codecs
from ..codecs import Scratch
from ..config import AggregatorSettings
from ..fedavg import StreamingAverage
from ..params import Params
from ..robust import (
    NormWindow,
    Rule,
    clip_scale,
    coordinate_median,
    multi_krum,
    share_cap,
    trimmed_mean,
)
from ..wire import QTensor

#: Norms needed before the adaptive clip bound is trusted; until then updates are held.
MIN_NORMS = 4
#: A delta longer than this many clip bounds is absurd: refused (``norm``), not clipped.
REJECT_FACTOR = 10.0


@dataclass
class Contribution:
    """An admitted update as the fold sees it: its tensors, weight and measured norm."""

    sender: str
    tensors: Sequence[QTensor]
    weight: float
    norm: float
    samples: int = 1


@dataclass(frozen=True)
class FoldStats:
    """What the safety rules did in one round."""

    weight_total: float
    weight_share_max: float
    clipped: int
    clip_bound: float
    #: samples behind the round once weights are capped: what a sync tells the parent.
    samples: int


class RoundFold:
    """Weighted (or robust) average of one round's deltas with both safety rules applied.

    - Weights: no child keeps more than ``max_share`` of the round's capped total
      (``robust.share_cap``).
    - Norms: each delta is scaled down to ``clip_factor`` times the median norm of
      recently accepted updates (``window``) when it is longer; 0 turns clipping off.

    The share cap only rises as children are added and the clip bound is fixed once
    the window holds ``MIN_NORMS``, so FedAvg folds an update at once when its weight is
    under the cap so far; the rest are held (a few: at most ``1/max_share`` can be over
    it) and folded at ``result`` with the final cap.
    """

    def __init__(
        self,
        rule: Rule = "fedavg",
        *,
        max_share: float = 1.0,
        clip_factor: float = 0.0,
        window: NormWindow | None = None,
        trim: float = 0.1,
        byzantine: int = 1,
    ) -> None:
        self.rule = rule
        self.max_share = max_share
        self.clip_factor = clip_factor
        self.window = window if window is not None else NormWindow()
        self.trim = trim
        self.byzantine = byzantine
        self.count = 0
        self.clipped = 0
        self.norms: list[float] = []
        self._weights: list[float] = []
        self._contributions: list[tuple[float, int]] = []
        self._held: list[Contribution] = []
        # A weight at most this stays under the final share cap whatever comes later:
        # max_share times the capped total so far (the cap only rises).
        self._floor = math.inf if max_share >= 1.0 else 0.0
        self._sum = StreamingAverage()
        self._window_bound: float | None = None
        self._scratch = Scratch()

    @classmethod
    def from_settings(cls, settings: AggregatorSettings, window: NormWindow) -> RoundFold:
        """The fold a node's round uses: its rule and safety settings, its norm window."""
        return cls(
            settings.rule,
            max_share=settings.max_weight_share,
            clip_factor=settings.clip_factor,
            window=window,
            trim=settings.trim,
            byzantine=settings.byzantine,
        )

    @property
    def held(self) -> int:
        return len(self._held)

    def measure(self, tensors: Sequence[QTensor]) -> float:
        """The delta's L2 norm (inf when absurd); leaves what its codecs decoded in the
        scratch for an ``add`` next."""
        return math.sqrt(codecs.squared_norm(tensors, self._scratch))

    def add(self, c: Contribution, *, fresh: bool = True) -> None:
        """Take one admitted update with its (finite) norm; ``fresh``: ``measure`` was just
        called on it, so what it decoded is still in the scratch."""
        self.count += 1
        self._contributions.append((c.weight, c.samples))
        self._weights.append(c.weight)
        self.norms.append(c.norm)
        if self.rule != "fedavg":
            self._held.append(c)
            return
        bound = self._bound()
        if bound is not None and c.weight <= self._floor:
            self._fold(c, c.weight, bound, self._scratch if fresh else None)
            self._floor += self.max_share * c.weight
            return
        self._held.append(c)
        self._release(bound)

    def reject_bound(self) -> float:
        """Norms above this are absurd (``REJECT_FACTOR`` clip bounds); inf until known."""
        bound = self._bound() if len(self.window) >= MIN_NORMS else None
        return math.inf if bound is None else REJECT_FACTOR * bound

    def _bound(self) -> float | None:
        """The clip bound now, or None while too few norms are known to trust one."""
        if self.clip_factor <= 0:
            return math.inf
        if self._window_bound is None:
            # Fixed once known for the rest of the round (the window only moves between
            # rounds): from the window, or, while it is short, with this round's first norms.
            if len(self.window) >= MIN_NORMS:
                self._window_bound = self.window.bound(self.clip_factor)
            elif len(self.window) + len(self.norms) >= MIN_NORMS:
                self._window_bound = self.window.bound(self.clip_factor, self.norms)
        return self._window_bound

    def _release(self, bound: float | None) -> None:
        if bound is None or len(self._weights) * self.max_share < 1.0 - 1e-12:
            return
        cap = share_cap(self._weights, self.max_share)
        if self.max_share < 1.0:
            self._floor = self.max_share * sum(min(w, cap) for w in self._weights)
        keep = []
        for c in self._held:
            if c.weight <= cap:
                self._fold(c, c.weight, bound, None)
            else:
                keep.append(c)
        self._held = keep

    def _fold(self, c: Contribution, weight: float, bound: float, scratch: Scratch | None) -> None:
        scale = clip_scale(c.norm, bound)
        self.clipped += scale < 1.0
        self._sum.add_quantized(c.tensors, weight, scale, scratch)

    def result(self) -> tuple[Params, FoldStats]:
        """The round's average delta and what the rules did; raises if nothing was added."""
        if self.count == 0:
            raise ValueError("no updates to average")
        cap = share_cap(self._weights, self.max_share)
        bound = self._bound()
        if bound is None:  # fewer than MIN_NORMS norms ever: clip to this round's median
            bound = NormWindow(norms=self.norms).bound(self.clip_factor)
        capped = [min(w, cap) for w in self._weights]
        total = float(sum(capped))
        samples = sum(n * min(1.0, cap / w) for w, n in self._contributions)
        share = max(capped) / total
        if self.rule == "fedavg":
            for c in self._held:
                self._fold(c, min(c.weight, cap), bound, None)
            self._held = []
            delta = self._sum.result()
        else:
            delta = self._robust(bound)
        for n in self.norms:  # this round's norms join the window the next one clips against
            self.window.add(n)
        return delta, FoldStats(total, share, self.clipped, bound, max(1, round(samples)))

    def _robust(self, bound: float) -> Params:
        deltas = []
        for c in self._held:
            scale = clip_scale(c.norm, bound)
            self.clipped += scale < 1.0
            d = codecs.decode_params(c.tensors)
            deltas.append({n: (a * np.float32(scale)).astype(np.float32) for n, a in d.items()})
        if self.rule == "median":
            return coordinate_median(deltas)
        if self.rule == "trimmed_mean":
            return trimmed_mean(deltas, self.trim)
        return multi_krum(deltas, self.byzantine)
