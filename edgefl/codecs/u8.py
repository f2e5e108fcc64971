"""The ``u8`` codec (the default): per tensor ``x ~= lo + scale * q``, one uint8 per value.

The quantization itself is ``edgefl.quant``; this module is its wire form, checks,
norm and fold. Pure: no I/O.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import Reason, Rejected
from ..quant import LEVELS, dequantize, quantize
from ..wire import QTensor
from .base import TORCH_FOLD_MIN, Block, Scratch, check_range, count_of, fold_dense


class U8:
    """Dense uint8: ``q`` holds one byte per value, row-major."""

    name = "u8"

    def encode(
        self,
        name: str,
        x: np.ndarray,
        *,
        fraction: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> QTensor:
        qt = quantize(x, stochastic=rng is not None, rng=rng)
        return QTensor(
            name=name,
            shape=list(np.shape(x)),
            lo=qt.lo,
            scale=qt.scale,
            q=qt.q.tobytes(),
            codec=self.name,
        )

    def check(self, t: QTensor) -> None:
        if len(t.q) != count_of(t):
            raise Rejected(Reason.SHAPE, f"{t.name}: {len(t.q)} bytes for shape {t.shape}")
        check_range(t, LEVELS)

    def decode(self, t: QTensor) -> np.ndarray:
        q = np.frombuffer(t.q, dtype=np.uint8).reshape(t.shape)
        return dequantize(t.lo, t.scale, q)

    def squared_norm(self, t: QTensor, scratch: Scratch | None = None) -> float:
        """``N lo^2 + 2 lo scale sum(q) + scale^2 sum(q^2)``: one widening pass and two
        reductions, no dequantized copy; the widened values stay in ``scratch``."""
        size = len(t.q)
        if size >= TORCH_FOLD_MIN:
            buf = scratch.buffer(t.name, size) if scratch is not None else torch.empty(size)
            buf.copy_(torch.frombuffer(t.q, dtype=torch.uint8))
            if scratch is not None:
                scratch.keep(t.name, buf)
            s1, s2 = float(buf.sum()), float(buf.dot(buf))
        else:  # float32 sums of at most 8191 integers below 2**16: exact
            a = np.frombuffer(t.q, dtype=np.uint8).astype(np.float32)
            s1, s2 = float(a.sum()), float(a @ a)
        lo, sc = t.lo, t.scale
        return max(0.0, size * lo * lo + 2.0 * lo * sc * s1 + sc * sc * s2)

    def fold(self, block: Block, t: QTensor, coef: float, scratch: Scratch | None = None) -> float:
        """``coef*scale*q`` into the block, from the widened values when ``scratch`` has
        them; ``coef*lo`` is the constant left to the caller."""
        if t.scale:
            wide = scratch.kept(t.name) if scratch is not None else None
            if isinstance(wide, torch.Tensor):
                block[1].add_(wide, alpha=coef * t.scale)
            else:
                fold_dense(block, t.q, "u1", coef * t.scale)
        return coef * t.lo

    def values(self, t: QTensor) -> int:
        return count_of(t)

    def payload_bytes(self, count: int, fraction: float = 1.0) -> int:
        return count


CODEC = U8()
