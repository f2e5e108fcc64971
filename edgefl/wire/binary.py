"""Binary payloads to bytes and back, all through msgspec's msgpack: Update and Delta
(msgspec Structs), Announcement and Model (pydantic, from msgpack maps). Decoding
untrusted bytes returns a valid object or raises ``Rejected``; sizes are checked before
parsing. Update signatures (HMAC) are made and checked here.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import msgspec
import numpy as np
from pydantic import ValidationError

from ..errors import Reason, Rejected
from ..params import Params, Spec
from ..quant import check_range, dequantize, quantize
from .schemas import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    Announcement,
    Delta,
    FTensor,
    Model,
    Update,
    first_error,
)

# ---------------------------------------------------------------- msgpack codec

_ENCODER = msgspec.msgpack.Encoder()
_MAP_DECODER = msgspec.msgpack.Decoder(dict[str, Any])


def pack_map(obj: Mapping[str, Any]) -> bytes:
    """A map as msgpack (bytes as bin, each value in its shortest form)."""
    return _ENCODER.encode(obj)


def unpack_map(data: bytes, max_bytes: int) -> dict[str, Any]:
    """A msgpack map from untrusted bytes, or ``Rejected``.

    The size is checked before parsing; msgspec refuses a length that claims more than
    the bytes left (no allocation on the claim), nesting deeper than its limit, and
    extension types (not in ``dict[str, Any]``)."""
    if len(data) > max_bytes:
        raise Rejected(Reason.OVERSIZED, f"{len(data)} bytes > {max_bytes}")
    try:
        return _MAP_DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise Rejected(Reason.MALFORMED, f"not a msgpack map: {str(exc)[:80]}") from None


def _signed_body(update: Update) -> bytes:
    """Canonical bytes an update's signature covers: every field but ``sig``, keys sorted."""
    fields = msgspec.structs.asdict(update)
    fields["tensors"] = [msgspec.structs.asdict(t) for t in update.tensors]
    return pack_map({k: fields[k] for k in sorted(fields) if k != "sig"})


def sign(update: Update, key: bytes) -> Update:
    """Return ``update`` with ``sig`` = HMAC-SHA256 of its other fields under ``key``."""
    sig = hmac.new(key, _signed_body(update), hashlib.sha256).digest()
    return msgspec.structs.replace(update, sig=sig)


def verify(update: Update, key: bytes) -> None:
    """Raise ``Rejected(bad_signature)`` unless ``update.sig`` matches ``key``."""
    if update.sig is None:
        raise Rejected(Reason.BAD_SIGNATURE, "unsigned")
    expected = hmac.new(key, _signed_body(update), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, update.sig):
        raise Rejected(Reason.BAD_SIGNATURE, "signature mismatch")


_UPDATE_ENCODER = msgspec.msgpack.Encoder()
_UPDATE_DECODER = msgspec.msgpack.Decoder(Update)


def encode_update(update: Update) -> bytes:
    return _UPDATE_ENCODER.encode(update)


def decode_update(
    data: bytes,
    spec: Spec | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    check: bool = True,
) -> Update:
    """Parse and validate untrusted bytes as an Update.

    With ``spec`` the tensor names and shapes must match the model exactly.
    Signature, duplicate, staleness and norm checks need node state and are
    the aggregator's job; ``check=False`` leaves ``check_tensors`` to it as well,
    so that it may first know who sent the update.
    """
    update = _decoded(_UPDATE_DECODER, data, max_bytes)
    if check:
        check_tensors(update, spec)
    return update


#: Most values a tensor's shape may span, zero dimensions aside (numpy refuses more).
MAX_ELEMENTS = 1 << 40


def _shape_ok(shape: list[int]) -> bool:
    return math.prod(max(d, 1) for d in shape) <= MAX_ELEMENTS


def check_tensors(update: Update | Delta, spec: Spec | None) -> None:
    """Shape bounds, each tensor's codec check (sizes, finite values), names/shapes
    against ``spec``."""
    from .. import codecs  # the codecs build on QTensor: imported once wire is whole

    for t in update.tensors:
        if not _shape_ok(t.shape):
            raise Rejected(Reason.SHAPE, f"{t.name}: shape {t.shape[:8]} is too large")
        codecs.get(t.codec).check(t)
    if spec is None:
        return
    got = {t.name: tuple(t.shape) for t in update.tensors}
    if len(got) != len(update.tensors) or got != dict(spec):
        missing = sorted(set(spec) - set(got))
        extra = sorted(set(got) - set(spec))
        wrong = sorted(n for n in set(got) & set(spec) if got[n] != tuple(spec[n]))
        raise Rejected(
            Reason.SHAPE, f"missing={missing[:3]} extra={extra[:3]} wrong_shape={wrong[:3]}"
        )


#: A ``u8`` model tensor's header: ``lo`` and ``scale``, little-endian float64.
_U8_HEADER = struct.Struct("<dd")
#: Each model dtype's values as numpy reads them.
_MODEL_DTYPES: dict[str, np.dtype[Any]] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "u8": np.dtype("u1"),
}


def encode_model(model: Model) -> bytes:
    return pack_map(model.model_dump())


def decode_model(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Model:
    """Parse a Model; raises ``Rejected(malformed|oversized|shape)`` on bad input.

    Nothing else escapes: a child decodes whatever lands on its parent's model topic.
    """
    model = _validated(Model, unpack_map(data, max_bytes))
    for t in model.tensors:
        header = _U8_HEADER.size if t.dtype == "u8" else 0
        size = math.prod(t.shape) * _MODEL_DTYPES[t.dtype].itemsize + header
        if not _shape_ok(t.shape) or len(t.data) != size:
            raise Rejected(Reason.SHAPE, f"{t.name}: {len(t.data)} bytes for {t.shape}")
        if header:
            check_range(t.name, *_U8_HEADER.unpack_from(t.data))
    return model


#: An announcement is small: ids, receipts, a config; never a model.
MAX_ANNOUNCEMENT_BYTES = 4 * 1024 * 1024


def encode_announcement(announcement: Announcement) -> bytes:
    return pack_map(announcement.model_dump())


def decode_announcement(data: bytes, *, max_bytes: int = MAX_ANNOUNCEMENT_BYTES) -> Announcement:
    """Parse an Announcement; ``Rejected(malformed|oversized)`` on bad input, nothing else."""
    return _validated(Announcement, unpack_map(data, max_bytes))


_M = TypeVar("_M", Model, Announcement)


def _validated(cls: type[_M], obj: dict[str, Any]) -> _M:
    if obj.get("v") != SCHEMA_VERSION:
        raise Rejected(Reason.MALFORMED, f"schema version {obj.get('v')!r}")
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        raise Rejected(Reason.MALFORMED, first_error(exc)) from None
    except Exception as exc:  # a validator tripping on input pydantic did not foresee
        raise Rejected(Reason.MALFORMED, f"not a {cls.__name__}: {type(exc).__name__}") from None


_DELTA_ENCODER = msgspec.msgpack.Encoder()
_DELTA_DECODER = msgspec.msgpack.Decoder(Delta)


def encode_delta(delta: Delta) -> bytes:
    return _DELTA_ENCODER.encode(delta)


def decode_delta(
    data: bytes, spec: Spec | None = None, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> Delta:
    """Parse and check a Delta (sizes, finiteness, and names and shapes against ``spec``)."""
    delta = _decoded(_DELTA_DECODER, data, max_bytes)
    if delta.version <= delta.base:
        raise Rejected(Reason.VERSION, f"delta from v{delta.base} to v{delta.version}")
    check_tensors(delta, spec)
    return delta


def model_tensors(params: Params, dtype: Literal["f32", "f16", "u8"] = "f32") -> list[FTensor]:
    """Dense wire tensors of ``params``: exact in float32, or float16 (half the bytes),
    or uint8 (a quarter: each value within half a quantization step)."""
    if dtype == "u8":
        out = []
        for n, a in params.items():
            q = quantize(a)
            data = _U8_HEADER.pack(q.lo, q.scale) + q.q.tobytes()
            out.append(FTensor(name=n, shape=list(a.shape), dtype="u8", data=data))
        return out
    np_dtype = _MODEL_DTYPES[dtype]
    return [
        FTensor(name=n, shape=list(a.shape), dtype=dtype, data=a.astype(np_dtype).tobytes())
        for n, a in params.items()
    ]


def model_params(model: Model) -> Params:
    """The float32 parameters carried by a (checked) Model."""
    out: Params = {}
    for t in model.tensors:
        if t.dtype == "u8":
            lo, scale = _U8_HEADER.unpack_from(t.data)
            q = np.frombuffer(t.data, np.uint8, offset=_U8_HEADER.size)
            out[t.name] = dequantize(lo, scale, q).reshape(t.shape)
        else:
            raw = np.frombuffer(t.data, dtype=_MODEL_DTYPES[t.dtype])
            out[t.name] = raw.astype(np.float32).reshape(t.shape)
    return out


_S = TypeVar("_S", Update, Delta)


def _decoded(decoder: msgspec.msgpack.Decoder[_S], data: bytes, max_bytes: int) -> _S:
    """A msgspec Struct from untrusted bytes (size first, then schema and version)."""
    if len(data) > max_bytes:
        raise Rejected(Reason.OVERSIZED, f"{len(data)} bytes > {max_bytes}")
    try:
        found = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise Rejected(Reason.MALFORMED, str(exc)[:200]) from None
    except Exception as exc:  # DecodeError, but also UnicodeDecodeError and others on garbage
        raise Rejected(Reason.MALFORMED, f"not msgpack: {type(exc).__name__}") from None
    if found.v != SCHEMA_VERSION:
        raise Rejected(Reason.MALFORMED, f"schema version {found.v!r}")
    return found
