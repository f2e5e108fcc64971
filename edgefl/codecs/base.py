"""The Codec protocol, and what codecs share: range checks, the fold's block and scratch.

A codec turns one float32 tensor into a wire ``QTensor`` and back, and checks one that
came from an untrusted sender. Pure numpy and torch: no I/O, no asyncio.
"""

from __future__ import annotations

import math
import warnings
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .. import quant
from ..wire import QTensor

#: Below this many values numpy's smaller per-call overhead beats torch's fused kernel.
TORCH_FOLD_MIN = 8192

#: A tensor's slot in the streaming accumulator: flat float32 values and a torch view.
Block = tuple[np.ndarray, torch.Tensor]

# torch.frombuffer warns that a bytes payload is read-only; the folds only read it.
warnings.filterwarnings(
    "ignore", message="The given buffer is not writable", category=UserWarning, module="edgefl"
)


class Scratch:
    """What measuring an update leaves for folding it right after, per tensor name.

    A codec ``keep``s its decoded form there in ``squared_norm`` (u8: the values
    widened to float32 in a reused buffer; topk: its parsed indices and values) and
    finds it again in ``fold``; ``begin`` forgets the previous update's.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._kept: dict[str, object] = {}

    def begin(self) -> None:
        self._kept.clear()

    def buffer(self, name: str, size: int) -> torch.Tensor:
        """A float32 buffer of ``size`` values for ``name``, reused across updates."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() != size:
            buf = self._buffers[name] = torch.empty(size)
        return buf

    def keep(self, name: str, value: object) -> None:
        self._kept[name] = value

    def kept(self, name: str) -> object | None:
        return self._kept.get(name)


@runtime_checkable
class Codec(Protocol):
    """How one tensor of an update travels. ``name`` is the wire tensor's ``codec``.

    - ``encode``: a float32 array to a QTensor; ``fraction`` is the share of values a
      sparse codec keeps (dense ones ignore it), ``rng`` asks for stochastic rounding.
    - ``check``: raise ``Rejected`` (shape, nonfinite, malformed) unless an untrusted
      QTensor's payload matches its shape and decodes to finite float32 values.
    - ``decode``: the float32 array of a checked QTensor.
    - ``squared_norm``: of the decoded values, in float64, without a dense copy where
      it can; may ``keep`` what ``fold`` reuses in ``scratch``.
    - ``fold``: ``block += coef * values`` (flat) from a checked QTensor; returns a
      constant the caller adds to every value of the tensor once at the end.
    - ``values``: how many values a checked QTensor carries (dense: all), which a
      node holds against its round config's ``min_fraction``.
    - ``payload_bytes``: the size of ``q`` for ``count`` values at ``fraction``
      (an estimate where it depends on the data), for deadline checks.
    """

    name: str

    def encode(
        self,
        name: str,
        x: np.ndarray,
        *,
        fraction: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> QTensor: ...

    def check(self, t: QTensor) -> None: ...

    def decode(self, t: QTensor) -> np.ndarray: ...

    def squared_norm(self, t: QTensor, scratch: Scratch | None = None) -> float: ...

    def fold(
        self, block: Block, t: QTensor, coef: float, scratch: Scratch | None = None
    ) -> float: ...

    def values(self, t: QTensor) -> int: ...

    def payload_bytes(self, count: int, fraction: float = 1.0) -> int: ...


def count_of(t: QTensor) -> int:
    return math.prod(t.shape)


def check_range(t: QTensor, levels: int) -> None:
    """``lo`` and ``scale >= 0`` finite, and ``lo + levels*scale`` a finite float32."""
    quant.check_range(t.name, t.lo, t.scale, levels)


_TORCH_DTYPES = {"u1": torch.uint8, "<f4": torch.float32, "<f2": torch.float16}


def fold_dense(block: Block, q: bytes, dtype: str, coef: float) -> None:
    """``block += coef * q`` for values of numpy ``dtype`` (``u1``, ``<f4``, ``<f2``) in ``q``.

    Fused in torch for large tensors (numpy widens in an extra pass, 1.7x the cost),
    in numpy for small ones (a torch call costs more than the arithmetic).
    """
    flat, view = block
    if flat.size >= TORCH_FOLD_MIN:
        view.add_(torch.frombuffer(q, dtype=_TORCH_DTYPES[dtype]), alpha=coef)
    else:
        flat += np.frombuffer(q, dtype) * np.float32(coef)
