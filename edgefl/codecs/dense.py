"""The dense float codecs: ``f32`` (the uncompressed baseline) and ``f16`` (half the bytes).

Raw little-endian values in ``q``, ``lo = 0`` and ``scale = 1``. Pure: no I/O.
"""

from __future__ import annotations

import numpy as np

from ..errors import Reason, Rejected
from ..wire import QTensor
from .base import Block, Scratch, count_of, fold_dense


class Dense:
    """Raw floats of numpy ``dtype``; values beyond its range are clipped at encoding
    (error feedback carries what was clipped)."""

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.dtype = dtype
        self.width = np.dtype(dtype).itemsize
        self._max = float(np.finfo(np.dtype(dtype)).max)

    def encode(
        self,
        name: str,
        x: np.ndarray,
        *,
        fraction: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> QTensor:
        arr = np.asarray(x, np.float32)
        if self.width < 4:
            arr = np.clip(arr, -self._max, self._max)
        data = np.ascontiguousarray(arr, self.dtype).tobytes()
        return QTensor(name=name, shape=list(arr.shape), lo=0.0, scale=1.0, q=data, codec=self.name)

    def check(self, t: QTensor) -> None:
        if len(t.q) != count_of(t) * self.width:
            raise Rejected(Reason.SHAPE, f"{t.name}: {len(t.q)} bytes for shape {t.shape}")
        if not np.isfinite(np.frombuffer(t.q, dtype=self.dtype)).all():
            raise Rejected(Reason.NONFINITE, f"{t.name}: non-finite values")

    def decode(self, t: QTensor) -> np.ndarray:
        return np.frombuffer(t.q, dtype=self.dtype).astype(np.float32).reshape(t.shape)

    def squared_norm(self, t: QTensor, scratch: Scratch | None = None) -> float:
        x = np.frombuffer(t.q, dtype=self.dtype)
        if self.width < 4:
            x = x.astype(np.float32)
        return float(np.dot(x, x))

    def fold(self, block: Block, t: QTensor, coef: float, scratch: Scratch | None = None) -> float:
        fold_dense(block, t.q, self.dtype, coef)
        return 0.0

    def values(self, t: QTensor) -> int:
        return count_of(t)

    def payload_bytes(self, count: int, fraction: float = 1.0) -> int:
        return count * self.width


F32 = Dense("f32", "<f4")
F16 = Dense("f16", "<f2")
