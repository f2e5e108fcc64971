"""Error feedback: what a sender's codec did not send, added to its next delta.

``encode`` compensates, encodes and keeps the difference between the compensated
delta and what the receiver decodes, so nothing is lost over rounds, only delayed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..params import Params
from ..wire import QTensor
from .registry import decode_params, encode_params


class ErrorFeedback:
    """The residual a sender keeps per tensor (float32), carried across rounds."""

    def __init__(self, residual: Mapping[str, np.ndarray] | None = None) -> None:
        self.residual: Params = {k: np.asarray(v, np.float32) for k, v in (residual or {}).items()}

    def compensate(self, delta: Mapping[str, np.ndarray]) -> Params:
        return {
            name: (arr + self.residual[name]).astype(np.float32)
            if name in self.residual and self.residual[name].shape == arr.shape
            else np.asarray(arr, np.float32)
            for name, arr in delta.items()
        }

    def record(self, compensated: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
        self.residual = {n: (compensated[n] - sent[n]).astype(np.float32) for n in compensated}

    def encode(
        self,
        delta: Mapping[str, np.ndarray],
        codec: str = "u8",
        *,
        fraction: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> list[QTensor]:
        """Compensate, encode and record in one step; returns the wire tensors."""
        compensated = self.compensate(delta)
        tensors = encode_params(compensated, codec, fraction=fraction, rng=rng)
        self.record(compensated, decode_params(tensors))
        return tensors
