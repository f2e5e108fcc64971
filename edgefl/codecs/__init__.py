"""Update codecs: how a float32 delta travels as wire tensors, one module per codec.

The registry maps a wire tensor's ``codec`` to its ``Codec``; the rest of edgefl asks
it (``get``) and never tests a name. Built in: ``u8`` (default), ``topk``, ``f32``,
``f16``. A codec of one's own: ``load_codec("package.module:attribute")``.
"""

from __future__ import annotations

from . import dense, topk, u8
from .base import Block, Codec, Scratch
from .choice import Plan, least_bytes, plan
from .feedback import ErrorFeedback
from .registry import (
    CodecError,
    decode_params,
    encode_params,
    get,
    known,
    load_codec,
    names,
    register,
    squared_norm,
    update_bytes,
)

__all__ = [
    "Block",
    "Codec",
    "CodecError",
    "ErrorFeedback",
    "Plan",
    "Scratch",
    "decode_params",
    "encode_params",
    "get",
    "known",
    "least_bytes",
    "load_codec",
    "names",
    "plan",
    "register",
    "squared_norm",
    "update_bytes",
]

for _codec in (u8.CODEC, topk.CODEC, dense.F32, dense.F16):
    register(_codec)
