"""Model parameters as ordered name -> float32 numpy arrays, and their conversions.

Every tier exchanges and averages ``Params``; torch only appears at the edges
(``from_module`` / ``load_into``), bytes only through ``to_bytes`` / ``from_bytes``
(the one persisted form). Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated

import msgspec
import numpy as np

from .errors import Reason, Rejected

Params = dict[str, np.ndarray]
Spec = dict[str, tuple[int, ...]]


def spec_of(params: Mapping[str, np.ndarray]) -> Spec:
    """The names and shapes that every update for this model must match."""
    return {name: tuple(int(d) for d in arr.shape) for name, arr in params.items()}


def num_parameters(params: Mapping[str, np.ndarray]) -> int:
    return int(sum(arr.size for arr in params.values()))


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Params:
    """``a - b`` tensor by tensor, in float32."""
    return {name: (a[name] - b[name]).astype(np.float32, copy=False) for name in a}


def add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Params:
    """``a + b`` tensor by tensor, in float32."""
    return {name: (a[name] + b[name]).astype(np.float32, copy=False) for name in a}


def l2_norm(params: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all tensors taken together, accumulated in float64."""
    return float(np.sqrt(sum(float(np.dot(t.ravel(), t.ravel())) for t in params.values())))


def is_finite(params: Mapping[str, np.ndarray]) -> bool:
    """Whether every value of every tensor is finite."""
    return all(bool(np.isfinite(a).all()) for a in params.values())


def copy(params: Mapping[str, np.ndarray]) -> Params:
    return {name: np.array(arr, dtype=np.float32, copy=True) for name, arr in params.items()}


def from_module(module: object) -> Params:
    """The floating-point state of a ``torch.nn.Module`` as float32 numpy arrays."""
    state = module.state_dict()  # type: ignore[attr-defined]
    return {
        name: t.detach().to("cpu").float().numpy().copy()
        for name, t in state.items()
        if t.is_floating_point()
    }


def load_into(module: object, params: Mapping[str, np.ndarray]) -> None:
    """Copy ``params`` into a ``torch.nn.Module`` in place (names must match)."""
    import torch

    state = module.state_dict()  # type: ignore[attr-defined]
    with torch.no_grad():
        for name, arr in params.items():
            target = state[name]
            target.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(target.dtype))


#: A persisted tensor: name, shape, little-endian float32 values.
_Packed = list[tuple[str, list[Annotated[int, msgspec.Meta(ge=0)]], bytes]]
_PACK = msgspec.msgpack.Encoder()
_UNPACK = msgspec.msgpack.Decoder(_Packed)


def to_bytes(params: Mapping[str, np.ndarray]) -> bytes:
    """``params`` as msgpack ``[[name, shape, float32 bytes], ...]``, in key order."""
    return _PACK.encode(
        [(n, list(a.shape), np.ascontiguousarray(a, "<f4").tobytes()) for n, a in params.items()]
    )


def from_bytes(data: bytes) -> Params:
    """The Params of ``to_bytes``; ``Rejected(malformed)`` for anything else (a damaged
    file, another format), never another error."""
    try:
        packed = _UNPACK.decode(data)
    except Exception as exc:  # msgspec's DecodeError and ValidationError, on any garbage
        raise Rejected(Reason.MALFORMED, f"not packed params: {str(exc)[:120]}") from None
    out: Params = {}
    for name, shape, raw in packed:
        if len(shape) > 8 or math.prod(shape) * 4 != len(raw) or name in out:
            raise Rejected(Reason.MALFORMED, f"{name[:64]!r}: {len(raw)} bytes for {shape[:8]}")
        out[name] = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    return out
