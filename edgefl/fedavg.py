"""Federated averaging: a streaming weighted sum, staleness weights, update norms.

Pure numpy (torch for the codecs' fold) over ``(delta, weight)`` pairs; never
imports asyncio or MQTT. ``StreamingAverage`` holds O(model) memory whatever the
number of updates; the robust rules live in ``robust``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import numpy as np
import torch

from . import codecs
from .codecs import Scratch
from .params import Params
from .wire import QTensor

StalenessKind = Literal["constant", "polynomial", "hinge"]


def staleness_weight(
    staleness: int, kind: StalenessKind = "polynomial", a: float = 0.5, b: int = 4
) -> float:
    """Weight multiplier for an update ``staleness`` versions behind (FedAsync's families).

    constant: 1; polynomial: ``(1 + s) ** -a``; hinge: 1 up to ``b``, then
    ``1 / (a * (s - b) + 1)``.
    """
    if staleness < 0:
        raise ValueError(f"negative staleness {staleness}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + staleness) ** -a)
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}")


class Aggregate(Protocol):
    """What a node folds updates into during a round."""

    count: int
    total_weight: float

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None: ...
    def add_quantized(
        self, tensors: Sequence[QTensor], weight: float, scale: float = 1.0
    ) -> None: ...
    def result(self) -> Params: ...


#: Encoded updates summed in float32 before the block joins the float64 total: a
#: float32 fold moves half the bytes of a float64 one (it is the receive path's main
#: cost), and 64 float32 additions stay far below the uint8 quantization error.
BLOCK = 64


class StreamingAverage:
    """Weighted mean of deltas folded one at a time, in float64, O(model) memory.

    ``add_quantized`` sums blocks of up to ``BLOCK`` updates in float32 into
    reusable buffers, then adds each block to the float64 total.
    """

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        # Sum of w*lo per tensor: a scalar, added once in result() instead of
        # a full pass over the accumulator for every folded update.
        self._offset: dict[str, float] = {}
        # Per tensor, a flat float32 block and a torch view of it: one lookup per
        # tensor per update.
        self._blocks: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
        self._in_block = 0
        self.count = 0
        self.total_weight = 0.0

    def _slot(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        acc = self._sum.get(name)
        if acc is None:
            acc = self._sum[name] = np.zeros(shape, dtype=np.float64)
        return acc

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        for name, arr in delta.items():
            acc = self._slot(name, arr.shape)
            acc += weight * np.asarray(arr, dtype=np.float64)
        self.count += 1
        self.total_weight += weight

    def add_quantized(
        self,
        tensors: Sequence[QTensor],
        weight: float,
        scale: float = 1.0,
        scratch: Scratch | None = None,
    ) -> None:
        """Fold checked wire tensors times ``scale`` (a clip) through their codecs, without
        a float copy where the codec can (u8: ``c*lo + (c*s)*q`` with ``c = weight *
        scale``); ``weight`` alone joins the total.

        On the receive path of every aggregator: per tensor one dict lookup and the
        codec's multiply-add from the payload's bytes into a preallocated block;
        ``scratch`` holds what measuring the update decoded already.
        """
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        blocks = self._blocks
        coef = weight * scale
        for t in tensors:
            pair = blocks.get(t.name)
            if pair is None:
                size = self._slot(t.name, tuple(t.shape)).size
                block = np.zeros(size, np.float32)
                pair = blocks[t.name] = (block, torch.from_numpy(block))
            offset = codecs.get(t.codec).fold(pair, t, coef, scratch)
            if offset:
                self._offset[t.name] = self._offset.get(t.name, 0.0) + offset
        self.count += 1
        self.total_weight += weight
        self._in_block += 1
        if self._in_block >= BLOCK:
            self._flush()

    def _flush(self) -> None:
        for name, (block, _) in self._blocks.items():
            acc = self._sum[name]
            acc += block.reshape(acc.shape)
            block.fill(0.0)
        self._in_block = 0

    def result(self) -> Params:
        if self.count == 0:
            raise ValueError("no updates to average")
        self._flush()
        return {
            n: ((acc + self._offset.get(n, 0.0)) / self.total_weight).astype(np.float32)
            for n, acc in self._sum.items()
        }


def weighted_average(pairs: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> Params:
    """FedAvg of ``(delta, num_examples)`` pairs in one call."""
    acc = StreamingAverage()
    for delta, weight in pairs:
        acc.add(delta, weight)
    return acc.result()
