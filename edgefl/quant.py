"""uint8 quantization of arrays: the arithmetic the ``u8`` and ``topk`` codecs share.

Per tensor, asymmetric min/max: ``x ~= lo + scale * q`` with ``q`` in 0..255.
Pure numpy: never imports asyncio, MQTT or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import Reason, Rejected

LEVELS = 255
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_range(name: str, lo: float, scale: float, levels: int = LEVELS) -> None:
    """Of untrusted ``lo`` and ``scale``: both finite, ``scale >= 0``, and
    ``lo + levels * scale`` a finite float32; else ``Rejected(nonfinite)``."""
    if not (math.isfinite(lo) and math.isfinite(scale)) or scale < 0:
        raise Rejected(Reason.NONFINITE, f"{name}: lo={lo} scale={scale}")
    if abs(lo) > FLOAT32_MAX or abs(lo + levels * scale) > FLOAT32_MAX:
        raise Rejected(Reason.NONFINITE, f"{name}: lo + scale*q overflows float32")


@dataclass(frozen=True)
class Quantized:
    lo: float
    scale: float
    q: np.ndarray  # uint8, same shape as the input


def quantize(
    x: np.ndarray, *, stochastic: bool = False, rng: np.random.Generator | None = None
) -> Quantized:
    """Quantize one tensor to uint8.

    Deterministic rounding keeps every element within ``scale / 2``; stochastic
    rounding is unbiased (``E[dequantize] == x``) and needs ``rng`` for
    reproducibility. A constant tensor is exact (``scale == 0``).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return Quantized(0.0, 0.0, np.zeros(x.shape, dtype=np.uint8))
    lo32, hi32 = np.float32(x.min()), np.float32(x.max())
    if not (np.isfinite(lo32) and np.isfinite(hi32)):
        raise ValueError("cannot quantize a tensor with NaN or infinite values")
    lo, hi = float(lo32), float(hi32)
    if hi == lo:
        return Quantized(lo, 0.0, np.zeros(x.shape, dtype=np.uint8))
    scale = float(np.float32((hi - lo) / LEVELS))
    if scale == 0.0:
        # A range of a few denormals: one step of the whole range still keeps scale/2.
        scale = float(np.float32(hi - lo))
    # In place, in float32: this is the device's hot path and the bench holds it
    # to the cost of a plain float32 encode. x >= lo, so t >= 0 and truncation
    # after +0.5 rounds to nearest; the error is scale/2 up to float32 rounding.
    # Ranges so small that 1/scale overflows float32 (denormal steps) take float64.
    work = np.float32 if 1.0 / scale < FLOAT32_MAX else np.float64
    t = np.subtract(x, lo, dtype=work)
    t *= work(1.0 / scale)
    if stochastic:
        gen = rng if rng is not None else np.random.default_rng()
        t += gen.random(t.shape, dtype=work)
        np.minimum(t, LEVELS, out=t)
    else:
        t += work(0.5)  # at most 255.5 + float32 rounding: never wraps past 255
    q = t.astype(np.uint8)
    return Quantized(lo, scale, q)


def dequantize(lo: float, scale: float, q: np.ndarray) -> np.ndarray:
    """``lo + scale * q`` in float32."""
    return (np.float32(lo) + np.float32(scale) * q.astype(np.float32)).astype(np.float32)
