"""Federated averaging: a streaming weighted sum, staleness weights, update norms.

Pure numpy (torch for the quantized fold) over ``(delta, weight)`` pairs; never
imports asyncio or MQTT. ``StreamingAverage`` holds O(model) memory whatever the
number of updates; the robust rules live in ``robust``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import numpy as np
import torch

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
    pair: tuple[np.ndarray, torch.Tensor],
    q: bytes,
    dtype: type[np.generic],
    coef: float,
    widened: torch.Tensor | None = None,
) -> None:
    """``block += coef * q`` for little-endian ``q`` of ``dtype``, in float32.

    ``widened`` is ``q`` already in float32 (``Scratch`` left it there for the norm).
    """
    block, view = pair
    if widened is not None:
        view.add_(widened, alpha=coef)
    elif block.size >= TORCH_FOLD_MIN:
        view.add_(torch.frombuffer(q, dtype=_TORCH_DTYPES[dtype]), alpha=coef)
    else:
        block += np.frombuffer(q, dtype) * np.float32(coef)


class Scratch:
    """Reused float32 buffers, one per tensor name: an update's squared norm widens its
    uint8 values once, and a fold right after reads them instead of the bytes again."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.names: set[str] = set()  # whose buffer holds the update measured last

    def squared_norm(self, tensors: Sequence[QTensor]) -> float:
        """``||lo + scale*q||^2`` of a delta in float64 from float32 sums (inf if absurd).

        For uint8: ``N lo^2 + 2 lo scale sum(q) + scale^2 sum(q^2)``: one widening pass
        and two reductions, no dequantized copy.
        """
        names = self.names
        names.clear()
        total = 0.0
        for t in tensors:
            if t.dtype == "f32":
                x = np.frombuffer(t.q, dtype="<f4")
                total += float(np.dot(x, x))
                continue
            size = len(t.q)
            if size >= TORCH_FOLD_MIN:
                buf = self._buffers.get(t.name)
                if buf is None or buf.numel() != size:
                    buf = self._buffers[t.name] = torch.empty(size)
                buf.copy_(torch.frombuffer(t.q, dtype=torch.uint8))
                names.add(t.name)
                s1, s2 = float(buf.sum()), float(buf.dot(buf))
            else:  # float32 sums of at most 8191 integers below 2**16: exact
                a = np.frombuffer(t.q, dtype=np.uint8).astype(np.float32)
                s1, s2 = float(a.sum()), float(a @ a)
            lo, sc = t.lo, t.scale
            total += max(0.0, size * lo * lo + 2.0 * lo * sc * s1 + sc * sc * s2)
        return total

    def widened(self, name: str) -> torch.Tensor | None:
        return self._buffers[name] if name in self.names else None


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
        """Fold wire tensors, times ``scale`` (a clip), without a float copy: ``c*lo + (c*s)*q``
        with ``c = weight * scale``; ``weight`` alone joins the total.

        On the receive path of every aggregator: per tensor one dict lookup and one
        multiply-add from the payload's bytes into a preallocated block; fused in
        torch for large tensors (numpy widens uint8 in an extra pass, 1.7x the cost),
        in numpy for small ones (a torch call costs more than the arithmetic).
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
            if t.dtype == "u8":
                self._offset[t.name] = self._offset.get(t.name, 0.0) + coef * t.lo
                if t.scale:
                    wide = scratch.widened(t.name) if scratch is not None else None
                    _fold(pair, t.q, np.uint8, coef * t.scale, wide)
            else:
                _fold(pair, t.q, np.float32, coef)
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
