"""The ``topk`` codec: the largest values by magnitude, uint8-quantized, with their indices.

``q`` is ``k`` (uint32 little-endian), the ``k`` uint8 values (``lo + scale * v``), then
the index gaps as LEB128 varints: the first index, then ``idx[i] - idx[i-1] - 1``, so
indices are strictly increasing by construction and cost about one byte at ``k = n/10``.
What is not sent is the sender's error feedback (``codecs.ErrorFeedback``). Pure numpy.
"""

from __future__ import annotations

import struct

import numpy as np

from ..errors import Reason, Rejected
from ..quant import LEVELS, dequantize, quantize
from ..wire import QTensor
from .base import Block, Scratch, check_range, count_of

_K = struct.Struct("<I")
#: Bytes of the widest gap: 7 bits a byte covers the 2**40 values a tensor may hold.
MAX_VARINT = 6


def kept(count: int, fraction: float) -> int:
    """How many of ``count`` values ``fraction`` keeps: at least one, at most all."""
    if count == 0:
        return 0
    return min(count, max(1, round(fraction * count)))


def varint_len(values: np.ndarray) -> np.ndarray:
    """Bytes of each value's LEB128 varint."""
    v = np.asarray(values, np.uint64)
    n = np.ones(v.shape, np.int64)
    for j in range(1, MAX_VARINT):
        n += v >= np.uint64(1 << (7 * j))
    return n


def pack_varints(values: np.ndarray) -> bytes:
    """LEB128 varints of non-negative ``values`` below ``2**42``, vectorized by byte."""
    v = np.asarray(values, np.uint64)
    lengths = varint_len(v)
    out = np.empty(int(lengths.sum()), np.uint8)
    starts = np.cumsum(lengths) - lengths
    for j in range(int(lengths.max(initial=0))):
        has = lengths > j
        byte = (v[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lengths[has] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def unpack_varints(data: bytes, k: int, name: str) -> np.ndarray:
    """Exactly ``k`` canonical varints filling ``data``; ``Rejected(malformed)`` otherwise."""
    b = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if len(ends) != k or (k and ends[-1] != len(b) - 1):
        raise Rejected(Reason.MALFORMED, f"{name}: {len(ends)} index gaps in {len(b)} bytes, k={k}")
    if k == 0:
        return np.zeros(0, np.uint64)
    starts = np.empty(k, np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > MAX_VARINT:
        raise Rejected(Reason.MALFORMED, f"{name}: an index gap of {lengths.max()} bytes")
    if (b[ends[lengths > 1]] == 0).any():
        raise Rejected(Reason.MALFORMED, f"{name}: an index gap not in its shortest form")
    position = np.arange(len(b)) - np.repeat(starts, lengths)
    parts = (b & 0x7F).astype(np.uint64) << (np.uint64(7) * position.astype(np.uint64))
    return np.add.reduceat(parts, starts)


class TopK:
    """Top-k by magnitude; ``fraction`` at encoding is k as a share of the tensor."""

    name = "topk"

    def encode(
        self,
        name: str,
        x: np.ndarray,
        *,
        fraction: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> QTensor:
        flat = np.ascontiguousarray(x, np.float32).reshape(-1)
        k = kept(flat.size, fraction)
        if k < flat.size:
            idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
            idx.sort()
        else:
            idx = np.arange(flat.size)
        qt = quantize(flat[idx], stochastic=rng is not None, rng=rng)
        gaps = np.diff(idx, prepend=-1) - 1
        payload = _K.pack(k) + qt.q.tobytes() + pack_varints(gaps)
        return QTensor(
            name=name, shape=list(np.shape(x)), lo=qt.lo, scale=qt.scale, q=payload, codec=self.name
        )

    def parse(self, t: QTensor) -> tuple[np.ndarray, np.ndarray]:
        """The indices (int64, strictly increasing, in range) and uint8 values of ``t``;
        raises ``Rejected`` on anything else, whatever the sender put in ``q``."""
        count, q = count_of(t), t.q
        if len(q) < _K.size:
            raise Rejected(Reason.MALFORMED, f"{t.name}: {len(q)} bytes, no k")
        (k,) = _K.unpack_from(q)
        if k > count or (count and k == 0):
            raise Rejected(Reason.SHAPE, f"{t.name}: k={k} of {count} values")
        if not _K.size + 2 * k <= len(q) <= _K.size + k * (1 + MAX_VARINT):
            raise Rejected(Reason.SHAPE, f"{t.name}: {len(q)} bytes for k={k}")
        values = np.frombuffer(q, np.uint8, count=k, offset=_K.size)
        gaps = unpack_varints(q[_K.size + k :], k, t.name)
        idx = np.cumsum(gaps + np.uint64(1)) - np.uint64(1)
        # Every step adds at least one and less than 2**42: a wrap shows as a step down.
        if k and (idx[-1] >= count or not (idx[1:] > idx[:-1]).all()):
            raise Rejected(Reason.SHAPE, f"{t.name}: an index beyond {count} values")
        return idx.astype(np.int64), values

    def check(self, t: QTensor) -> None:
        self.parse(t)
        check_range(t, LEVELS)

    def decode(self, t: QTensor) -> np.ndarray:
        idx, values = self.parse(t)
        out = np.zeros(count_of(t), np.float32)
        out[idx] = dequantize(t.lo, t.scale, values)
        return out.reshape(t.shape)

    def _sparse(self, t: QTensor, scratch: Scratch | None) -> tuple[np.ndarray, np.ndarray]:
        found = scratch.kept(t.name) if scratch is not None else None
        if isinstance(found, tuple):
            return found
        idx, values = self.parse(t)
        return idx, dequantize(t.lo, t.scale, values)

    def squared_norm(self, t: QTensor, scratch: Scratch | None = None) -> float:
        idx, v = self._sparse(t, None)
        if scratch is not None:
            scratch.keep(t.name, (idx, v))
        return float(np.dot(v.astype(np.float64), v))

    def fold(self, block: Block, t: QTensor, coef: float, scratch: Scratch | None = None) -> float:
        idx, v = self._sparse(t, scratch)
        block[0][idx] += v * np.float32(coef)  # indices are unique: no lost additions
        return 0.0

    def values(self, t: QTensor) -> int:
        return int(_K.unpack_from(t.q)[0])

    def payload_bytes(self, count: int, fraction: float = 1.0) -> int:
        """``4 + k + k * len(varint(2 * count / k))``: an index gap is taken at twice its
        mean, so that random positions rarely need more (the real size depends on them)."""
        k = kept(count, fraction)
        if k == 0:
            return _K.size
        return _K.size + k + k * int(varint_len(np.array([2 * count // k]))[0])


CODEC = TopK()
