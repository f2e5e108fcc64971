"""Federated averaging: a streaming weighted sum, staleness weights, robust rules.

Pure numpy (torch for the quantized fold) over ``(delta, weight)`` pairs; never
imports asyncio or MQTT.
``StreamingAverage`` holds O(model) memory whatever the number of updates;
the robust rules (median, trimmed mean) must hold every update to sort them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import numpy as np
import torch

from .params import Params, l2_norm
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


def within_norm(delta: Mapping[str, np.ndarray], max_norm: float | None) -> bool:
    """The poisoning guard: is the update's L2 norm finite and at most ``max_norm``?"""
    norm = l2_norm(delta)
    return math.isfinite(norm) and (max_norm is None or norm <= max_norm)


class Aggregate(Protocol):
    """What a node folds updates into during a round."""

    count: int
    total_weight: float

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None: ...
    def add_quantized(self, tensors: Sequence[QTensor], weight: float) -> None: ...
    def result(self) -> Params: ...


#: Quantized updates summed in float32 before the block joins the float64 total: a
#: float32 fold moves half the bytes of a float64 one (it is the receive path's main
#: cost), and 64 float32 additions stay far below the uint8 quantization error.
BLOCK = 64

# torch.frombuffer warns that a bytes payload is read-only; the fold only reads it.
warnings.filterwarnings(
    "ignore", message="The given buffer is not writable", category=UserWarning, module=__name__
)


#: Below this many values numpy's smaller per-call overhead beats torch's fused kernel.
TORCH_FOLD_MIN = 8192
_TORCH_DTYPES = {np.uint8: torch.uint8, np.float32: torch.float32}


def _fold(
    pair: tuple[np.ndarray, torch.Tensor], q: bytes, dtype: type[np.generic], coef: float
) -> None:
    """``block += coef * q`` for little-endian ``q`` of ``dtype``, in float32."""
    block, view = pair
    if block.size >= TORCH_FOLD_MIN:
        view.add_(torch.frombuffer(q, dtype=_TORCH_DTYPES[dtype]), alpha=coef)
    else:
        block += np.frombuffer(q, dtype) * np.float32(coef)


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

    def add_quantized(self, tensors: Sequence[QTensor], weight: float) -> None:
        """Fold wire tensors without building a float copy: ``w*lo + (w*scale)*q``.

        On the receive path of every aggregator: per tensor one dict lookup and one
        multiply-add from the payload's bytes into a preallocated block; fused in
        torch for large tensors (numpy widens uint8 in an extra pass, 1.7x the cost),
        in numpy for small ones (a torch call costs more than the arithmetic).
        """
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        blocks = self._blocks
        for t in tensors:
            pair = blocks.get(t.name)
            if pair is None:
                size = self._slot(t.name, tuple(t.shape)).size
                block = np.zeros(size, np.float32)
                pair = blocks[t.name] = (block, torch.from_numpy(block))
            if t.dtype == "u8":
                self._offset[t.name] = self._offset.get(t.name, 0.0) + weight * t.lo
                if t.scale:
                    _fold(pair, t.q, np.uint8, weight * t.scale)
            else:
                _fold(pair, t.q, np.float32, weight)
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


class RobustAverage:
    """Coordinate-wise median or trimmed mean; holds every update (O(model x updates)).

    Weights are ignored by these rules: a poisoner could inflate its ``n``.
    """

    def __init__(self, rule: Literal["median", "trimmed_mean"], trim: float = 0.1) -> None:
        if rule not in ("median", "trimmed_mean"):
            raise ValueError(f"unknown robust rule {rule!r}")
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.rule = rule
        self.trim = trim
        self._deltas: list[Mapping[str, np.ndarray]] = []
        self.count = 0
        self.total_weight = 0.0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        self._deltas.append({n: np.asarray(a, np.float32) for n, a in delta.items()})
        self.count += 1
        self.total_weight += weight

    def add_quantized(self, tensors: Sequence[QTensor], weight: float) -> None:
        from .quant import dequantize_params

        self.add(dequantize_params(tensors), weight)

    def result(self) -> Params:
        if not self._deltas:
            raise ValueError("no updates to average")
        if self.rule == "median":
            return coordinate_median(self._deltas)
        return trimmed_mean(self._deltas, self.trim)


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


def weighted_average(pairs: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> Params:
    """FedAvg of ``(delta, num_examples)`` pairs in one call."""
    acc = StreamingAverage()
    for delta, weight in pairs:
        acc.add(delta, weight)
    return acc.result()
