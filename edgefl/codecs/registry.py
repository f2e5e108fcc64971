"""The codec registry: a wire tensor's ``codec`` name to its ``Codec``, and what is
done over a whole delta through it. Pure: no I/O.
"""

from __future__ import annotations

import math
import pkgutil
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..errors import EdgeflError, Reason, Rejected
from ..params import Params, Spec
from ..wire import QTensor
from .base import Codec, Scratch

#: What a codec may be called on the wire.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,15}$")
#: Bytes of an encoded Update besides its tensor payloads: the header, then name,
#: shape, lo and scale per tensor. Only used to judge whether an upload fits a deadline.
UPDATE_HEADER_BYTES = 160
TENSOR_HEADER_BYTES = 64


class CodecError(EdgeflError, ValueError):
    """A codec that cannot be registered or loaded; the message says why."""


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make ``codec`` known under ``codec.name``; registering the same object again is a
    no-op, another one under a taken name is a ``CodecError``."""
    if not isinstance(codec, Codec):
        raise CodecError(f"{codec!r} is not a Codec (name, encode, check, decode, ...)")
    name = codec.name
    if not isinstance(name, str) or not NAME.match(name):
        raise CodecError(f"codec name {name!r}: use [a-z][a-z0-9_]{{0,15}}")
    known = _REGISTRY.get(name)
    if known is not None and known is not codec:
        raise CodecError(f"codec {name!r} is registered already")
    _REGISTRY[name] = codec
    return codec


def get(name: str) -> Codec:
    """The codec of a wire tensor; ``Rejected(malformed)`` for a name nobody registered."""
    codec = _REGISTRY.get(name)
    if codec is None:
        raise Rejected(Reason.MALFORMED, f"unknown codec {name[:16]!r}")
    return codec


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def known(name: str) -> bool:
    return name in _REGISTRY


def load_codec(ref: str) -> Codec:
    """Import ``package.module:attribute`` (a Codec, or a class making one) and register it;
    a registered name is returned as is."""
    if ref in _REGISTRY:
        return _REGISTRY[ref]
    if ":" not in ref:
        raise CodecError(f"unknown codec {ref!r}: use {', '.join(names())} or 'module:attribute'")
    try:
        obj = pkgutil.resolve_name(ref)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CodecError(f"codec {ref!r}: {exc}") from None
    return register(obj() if isinstance(obj, type) else obj)


def encode_params(
    delta: Mapping[str, np.ndarray],
    codec: str = "u8",
    *,
    fraction: float = 1.0,
    rng: np.random.Generator | None = None,
) -> list[QTensor]:
    """Wire tensors of a whole delta with one codec, in its key order."""
    c = get(codec)
    return [c.encode(name, arr, fraction=fraction, rng=rng) for name, arr in delta.items()]


def decode_params(tensors: Iterable[QTensor]) -> Params:
    """The float32 delta that checked wire tensors carry."""
    return {t.name: get(t.codec).decode(t) for t in tensors}


def squared_norm(tensors: Sequence[QTensor], scratch: Scratch | None = None) -> float:
    """``||delta||^2`` of checked wire tensors in float64 (inf if absurd); what each codec
    decoded on the way stays in ``scratch`` for a fold right after."""
    if scratch is not None:
        scratch.begin()
    return sum(get(t.codec).squared_norm(t, scratch) for t in tensors)


def update_bytes(spec: Spec, codec: str = "u8", fraction: float = 1.0) -> int:
    """Encoded size of an update for ``spec``: within a few percent of the real one."""
    c = get(codec)
    payload = sum(c.payload_bytes(math.prod(shape), fraction) for shape in spec.values())
    return payload + UPDATE_HEADER_BYTES + TENSOR_HEADER_BYTES * len(spec)
