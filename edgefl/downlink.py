"""The downlink: a node's model to its children as quantized deltas, and a child's copy of it.

``Shared`` is what a node's children hold: each new version is the quantized
difference between the node's model and it (what quantization leaves out waits
for the next version: error feedback), and node and child apply it with the same
``advance``, so both hold the same bits. ``Follower`` is a child's side: the copy it
holds and what it must fetch for a version. Pure numpy: no I/O, no asyncio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np

from .errors import Reason, Rejected
from .params import Params, from_bytes, subtract, to_bytes
from .wire import Delta, Model, QTensor, model_params

Precision = Literal["f32", "f16"]
#: What a child must fetch to hold a version: nothing, the delta, or the whole model.
Need = Literal["none", "delta", "model"]


def held_as(params: Params, dtype: Precision) -> Params:
    """``params`` in the precision a model is held in (float32 values either way)."""
    if dtype == "f32":
        return {n: np.asarray(a, np.float32) for n, a in params.items()}
    return {n: np.asarray(a, np.float16).astype(np.float32) for n, a in params.items()}


def advance(held: Params, tensors: Iterable[QTensor], dtype: Precision) -> Params:
    """``held`` plus the dequantized ``tensors``: the one way node and child both apply it."""
    from . import codecs  # they build on wire's QTensor, as this module does

    out = dict(held)
    for t in tensors:
        values = codecs.get(t.codec).decode(t).reshape(held[t.name].shape)
        out[t.name] = np.add(held[t.name], values, dtype=np.float32)
    return held_as(out, dtype)


class Shared:
    """A node's copy of the model its children hold, and the deltas that move it."""

    def __init__(
        self, sender: str, dtype: Precision = "f32", codec: str = "u8", fraction: float = 1.0
    ) -> None:
        self.sender = sender
        self.dtype: Precision = dtype
        #: the codec of the deltas (``edgefl.codecs``) and, for a sparse one, the share kept
        self.codec = codec
        self.fraction = fraction
        self.held: Params | None = None
        self.version: int | None = None

    def move(self, params: Params, version: int) -> Delta | None:
        """Move the shared model towards ``params`` as ``version``; the Delta from the
        version published before (a node that adopted its parent's model right after a
        round skips one), or None when there is none to go from (the first version)."""
        held, base = self.held, self.version
        if held is not None and base == version:
            return None  # there already (a restarted node publishing it again)
        if held is None or base is None or version < base:
            self.held, self.version = held_as(params, self.dtype), version
            return None
        from . import codecs

        tensors = codecs.encode_params(subtract(params, held), self.codec, fraction=self.fraction)
        self.held, self.version = advance(held, tensors, self.dtype), version
        return Delta(
            sender=self.sender, version=version, base=base, tensors=tensors, dtype=self.dtype
        )

    def to_extra(self) -> dict[str, object] | None:
        """What a checkpoint keeps, so that a restarted node publishes the same bits
        under the same version (``move`` is deterministic)."""
        if self.held is None or self.version is None:
            return None
        return {"version": self.version, "held": to_bytes(self.held)}

    def restore(self, extra: object, spec: Mapping[str, tuple[int, ...]]) -> bool:
        """Take what ``to_extra`` kept; False (and nothing taken) if it does not fit."""
        if not isinstance(extra, dict) or not isinstance(extra.get("version"), int):
            return False
        try:
            held = from_bytes(extra["held"])
        except (Rejected, KeyError, TypeError):
            return False
        if {n: tuple(a.shape) for n, a in held.items()} != dict(spec):
            return False
        self.held, self.version = held_as(held, self.dtype), int(extra["version"])
        return True


class Follower:
    """A child's copy of its parent's model: what it holds and what it needs next."""

    def __init__(self) -> None:
        self.held: Params | None = None
        self.version: int | None = None

    def need(self, version: int, base: int | None = None) -> Need:
        """What holding ``version`` takes: nothing, its delta, or the whole model.

        ``base``, where the announcement names it, is the version the retained delta
        starts from: holding another one, the delta would not apply. Unknown, a delta
        from any older version is tried (a gap then fetches the whole model)."""
        if self.held is not None and self.version == version:
            return "none"
        if self.held is None or self.version is None or self.version > version:
            return "model"
        return "delta" if base is None or base == self.version else "model"

    def take_delta(self, delta: Delta) -> Params:
        """Apply a checked Delta; ``Rejected(version)`` unless it starts from what is held."""
        if self.held is None or delta.base != self.version:
            raise Rejected(Reason.VERSION, f"delta from v{delta.base}, holding v{self.version}")
        self.held, self.version = advance(self.held, delta.tensors, delta.dtype), delta.version
        return self.held

    def take_model(self, model: Model) -> Params:
        """Hold a checked whole Model."""
        self.held, self.version = model_params(model), model.version
        return self.held
