"""A codec of one's own, for the tests: symmetric int8, ``x ~= scale * q``."""

from __future__ import annotations

import numpy as np

from edgefl.codecs import Block, Scratch
from edgefl.errors import Reason, Rejected
from edgefl.wire import QTensor


class Int8:
    name = "i8"

    def encode(
        self,
        name: str,
        x: np.ndarray,
        *,
        fraction: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> QTensor:
        x = np.asarray(x, np.float32)
        top = float(np.abs(x).max(initial=0.0))
        scale = top / 127 if top else 0.0
        q = np.zeros(x.shape, np.int8) if not scale else np.rint(x / scale).astype(np.int8)
        return QTensor(
            name=name, shape=list(x.shape), lo=0.0, scale=scale, q=q.tobytes(), codec="i8"
        )

    def check(self, t: QTensor) -> None:
        if len(t.q) != int(np.prod(t.shape)) or not 0 <= t.scale < 1e30:
            raise Rejected(Reason.SHAPE, f"{t.name}: bad i8 tensor")

    def decode(self, t: QTensor) -> np.ndarray:
        return (np.frombuffer(t.q, np.int8).astype(np.float32) * np.float32(t.scale)).reshape(
            t.shape
        )

    def squared_norm(self, t: QTensor, scratch: Scratch | None = None) -> float:
        x = self.decode(t).ravel()
        return float(np.dot(x, x))

    def fold(self, block: Block, t: QTensor, coef: float, scratch: Scratch | None = None) -> float:
        flat = block[0]
        flat += self.decode(t).ravel() * np.float32(coef)
        return 0.0

    def values(self, t: QTensor) -> int:
        return len(t.q)

    def payload_bytes(self, count: int, fraction: float = 1.0) -> int:
        return count
