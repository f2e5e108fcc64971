"""Wire schemas and codecs: Update (msgspec) and Model as msgpack, Status and Metrics as JSON.

Decoding untrusted bytes returns a valid object or raises ``Rejected``;
nothing else escapes. Sizes are checked before parsing. No I/O here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import msgpack
import msgspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import Reason, Rejected
from .params import Params, Spec

SCHEMA_VERSION = 1
#: Version of the JSON monitoring payloads (Status, Metrics).
MONITOR_SCHEMA = 1
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class TrainConfig(_Strict):
    """Local training settings that a node sends to its children with each Model."""

    epochs: int = Field(1, ge=1, le=1000, description="local epochs per round")
    batch_size: int = Field(32, ge=1, le=65536, description="samples per training step")
    lr: float = Field(0.05, gt=0, le=10, description="learning rate of the local optimizer")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="the local optimizer")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty of the optimizer")
    mu: float = Field(0.0, ge=0, description="FedProx proximal term; 0 is plain FedAvg")
    clip: float | None = Field(None, gt=0, description="max gradient norm, none to disable")
    accum: int = Field(1, ge=1, le=1024, description="gradient accumulation steps")
    deadline_s: float = Field(30.0, gt=0, description="seconds until the round closes")
    #: the update codecs a child may send (``edgefl.codecs``); others are refused.
    codecs: list[Annotated[str, Field(max_length=16)]] = Field(
        default_factory=lambda: ["u8", "topk", "f32", "f16"],
        min_length=1,
        max_length=16,
        description="the update codecs a child may send (JSON list); others are refused",
    )
    min_fraction: float = Field(
        0.05, gt=0, le=1, description="least share of a tensor's values a sparse update keeps"
    )


Count = Annotated[int, msgspec.Meta(ge=0)]
#: Sequence numbers, rounds and versions stay exact in a float64 (JSON, JavaScript).
MAX_COUNTER = 2**53
Ordinal = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNTER)]


class QTensor(msgspec.Struct, forbid_unknown_fields=True):
    """One tensor of an update, as its ``codec`` lays it out in ``q`` (``edgefl.codecs``).

    ``u8``: ``x = lo + scale * q`` with ``q`` uint8; ``topk``: the same for the kept
    values, with their indices; ``f32``/``f16``: raw floats, ``lo = 0``, ``scale = 1``.
    """

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    shape: Annotated[list[Count], msgspec.Meta(max_length=8)]
    lo: float
    scale: float
    q: bytes
    #: the registered codec that wrote ``q``: looked up, never compared, by the receiver.
    codec: Annotated[str, msgspec.Meta(min_length=1, max_length=16)] = "u8"


class Update(msgspec.Struct, forbid_unknown_fields=True):
    """A child's quantized delta against model version ``base``.

    A msgspec Struct, not a pydantic model: every aggregator decodes one per
    received update, and msgspec parses and validates it in one pass in C, about
    8x faster than msgpack plus pydantic. Constructing one does not validate;
    ``decode_update`` does.
    """

    sender: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
    seq: Ordinal
    round: Ordinal
    base: Ordinal
    #: samples behind this update; its FedAvg weight, capped by the node (see admission).
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNTER)]
    tensors: Annotated[list[QTensor], msgspec.Meta(max_length=1 << 16)]
    v: int = SCHEMA_VERSION
    metrics: Annotated[dict[str, float], msgspec.Meta(max_length=1 << 12)] = msgspec.field(
        default_factory=dict
    )
    sig: bytes | None = None
    #: the sender's incarnation: a random id drawn when its outbox is created, so that a
    #: device whose storage was reset (seq from 0 again) is told apart from a replay.
    inc: Ordinal = 0
    #: the lowest seq its sender still keeps: every lower one is settled or given up,
    #: so its node's receipt may pass them (and must not pass a gap above it).
    low: Ordinal = 0


class FTensor(_Strict):
    """One dense tensor of a model: float32 or float16, little-endian."""

    name: str = Field(min_length=1, max_length=256)
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    dtype: Literal["f32", "f16"] = "f32"
    data: bytes


class Announcement(_Strict):
    """A node's round, retained on its ``round`` topic: small, and read by every child.

    The model itself travels apart (``Delta``, ``Model``): only a child that trains
    this round, or adopts every version (a gateway), fetches it.
    """

    v: int = SCHEMA_VERSION
    sender: str = Field(pattern=ID_PATTERN)
    #: the model version to train from this round
    version: int = Field(ge=0, le=MAX_COUNTER)
    round: int = Field(ge=0, le=MAX_COUNTER)
    config: TrainConfig = Field(default_factory=TrainConfig)
    #: device ids asked to train this round; empty means "any eligible child".
    selected: list[str] = Field(default_factory=list, max_length=1 << 16)
    #: wall-clock time (unix seconds) at which the round closes, on the node's clock.
    deadline: float = 0.0
    #: the node's clock when it published this: children judge ``deadline - sent_at``
    #: as a duration from when they received it, so a wrong board clock does not matter.
    sent_at: float = 0.0
    #: per child, ``(inc, seq)`` of the last update the node settled (folded into a saved
    #: round, or rejected for good): the child may forget every update up to it.
    receipts: dict[str, tuple[int, int]] = Field(default_factory=dict)
    #: Ed25519 signature by the sender of every other field (``edgefl.signing``).
    sig: bytes | None = None


class Model(_Strict):
    """A node's model at ``version``, whole: retained for children that need all of it."""

    v: int = SCHEMA_VERSION
    sender: str = Field(pattern=ID_PATTERN)
    version: int = Field(ge=0, le=MAX_COUNTER)
    tensors: list[FTensor]
    sig: bytes | None = None


class Delta(msgspec.Struct, forbid_unknown_fields=True):
    """Version ``version`` of a node's model as ``base`` (the version it published
    before) plus these quantized tensors.

    Child and node apply it the same way (``downlink.advance``), so both hold the same
    bits; a child that does not hold ``base`` fetches the whole Model instead.
    """

    sender: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
    version: Ordinal
    base: Ordinal
    tensors: Annotated[list[QTensor], msgspec.Meta(max_length=1 << 16)]
    #: the precision the model is held in: ``f16`` rounds every value after the sum
    dtype: Literal["f32", "f16"] = "f32"
    v: int = SCHEMA_VERSION
    sig: bytes | None = None


class Status(_Strict):
    """Liveness and profile of a child, retained, JSON. The LWT is ``online: false``."""

    schema_: int = Field(MONITOR_SCHEMA, alias="schema")
    online: bool
    role: Literal["device", "gateway", "cloud"] = "device"
    id: str = Field("", max_length=64)
    battery: float | None = Field(None, ge=0, le=1)
    charging: bool = True
    link: Literal["ethernet", "wifi", "cellular", "unknown"] = "unknown"
    uplink_kbps: float | None = Field(None, ge=0)
    buffered: int = Field(0, ge=0)
    model_version: int | None = None
    #: local training samples: the child's declared weight bound (the node caps it).
    samples: int | None = Field(None, ge=0, le=MAX_COUNTER)
    eligible: bool = True
    reason: str = ""
    #: the round the child declined, with ``reason``: its node stops waiting for it.
    declined: int | None = Field(None, ge=0, le=MAX_COUNTER)
    ts: float = Field(default_factory=time.time)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# ---------------------------------------------------------------- msgpack codec

_UNPACK_LIMITS = {
    "max_str_len": 1 << 16,
    "max_array_len": 1 << 16,
    "max_map_len": 1 << 12,
    "max_ext_len": 0,
}


def _pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes, max_bytes: int) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise Rejected(Reason.OVERSIZED, f"{len(data)} bytes > {max_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False, max_bin_len=max_bytes, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise Rejected(Reason.MALFORMED, f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise Rejected(Reason.MALFORMED, "not a map")
    return obj


def _signed_body(update: Update) -> bytes:
    """Canonical bytes an update's signature covers: every field but ``sig``, keys sorted."""
    fields = msgspec.structs.asdict(update)
    fields["tensors"] = [msgspec.structs.asdict(t) for t in update.tensors]
    return _pack({k: fields[k] for k in sorted(fields) if k != "sig"})


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
    if len(data) > max_bytes:
        raise Rejected(Reason.OVERSIZED, f"{len(data)} bytes > {max_bytes}")
    try:
        update = _UPDATE_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise Rejected(Reason.MALFORMED, str(exc)[:200]) from None
    except Exception as exc:  # DecodeError, but also UnicodeDecodeError and others on garbage
        raise Rejected(Reason.MALFORMED, f"not msgpack: {type(exc).__name__}") from None
    if update.v != SCHEMA_VERSION:
        raise Rejected(Reason.MALFORMED, f"schema version {update.v!r}")
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
    from . import codecs  # the codecs build on QTensor: imported once wire is whole

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


def encode_model(model: Model) -> bytes:
    return _pack(model.model_dump())


def decode_model(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Model:
    """Parse a Model; raises ``Rejected(malformed|oversized|shape)`` on bad input.

    Nothing else escapes: a child decodes whatever lands on its parent's model topic.
    """
    model = _validated(Model, _unpack(data, max_bytes))
    for t in model.tensors:
        width = 4 if t.dtype == "f32" else 2
        if not _shape_ok(t.shape) or len(t.data) != math.prod(t.shape) * width:
            raise Rejected(Reason.SHAPE, f"{t.name}: {len(t.data)} bytes for {t.shape}")
    return model


#: An announcement is small: ids, receipts, a config; never a model.
MAX_ANNOUNCEMENT_BYTES = 4 * 1024 * 1024


def encode_announcement(announcement: Announcement) -> bytes:
    return _pack(announcement.model_dump())


def decode_announcement(data: bytes, *, max_bytes: int = MAX_ANNOUNCEMENT_BYTES) -> Announcement:
    """Parse an Announcement; ``Rejected(malformed|oversized)`` on bad input, nothing else."""
    return _validated(Announcement, _unpack(data, max_bytes))


_M = TypeVar("_M", Model, Announcement)


def _validated(cls: type[_M], obj: dict[str, Any]) -> _M:
    if obj.get("v") != SCHEMA_VERSION:
        raise Rejected(Reason.MALFORMED, f"schema version {obj.get('v')!r}")
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        raise Rejected(Reason.MALFORMED, _first_error(exc)) from None
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
    if len(data) > max_bytes:
        raise Rejected(Reason.OVERSIZED, f"{len(data)} bytes > {max_bytes}")
    try:
        delta = _DELTA_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise Rejected(Reason.MALFORMED, str(exc)[:200]) from None
    except Exception as exc:  # DecodeError, but also UnicodeDecodeError and others on garbage
        raise Rejected(Reason.MALFORMED, f"not msgpack: {type(exc).__name__}") from None
    if delta.v != SCHEMA_VERSION:
        raise Rejected(Reason.MALFORMED, f"schema version {delta.v!r}")
    if delta.version <= delta.base:
        raise Rejected(Reason.VERSION, f"delta from v{delta.base} to v{delta.version}")
    check_tensors(delta, spec)
    return delta


def model_tensors(params: Params, dtype: Literal["f32", "f16"] = "f32") -> list[FTensor]:
    """Dense wire tensors of ``params`` (float16 halves the downlink)."""
    np_dtype = "<f4" if dtype == "f32" else "<f2"
    return [
        FTensor(name=n, shape=list(a.shape), dtype=dtype, data=a.astype(np_dtype).tobytes())
        for n, a in params.items()
    ]


def model_params(model: Model) -> Params:
    """The float32 parameters carried by a Model."""
    return {
        t.name: np.frombuffer(t.data, dtype="<f4" if t.dtype == "f32" else "<f2")
        .astype(np.float32)
        .reshape(t.shape)
        for t in model.tensors
    }


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg', 'invalid')}"[:200]


# ------------------------------------------------------------------ JSON codec


def encode_status(status: Status) -> bytes:
    return status.model_dump_json(by_alias=True).encode()


def decode_status(data: bytes, *, max_bytes: int = 64 * 1024) -> Status:
    if len(data) > max_bytes:
        raise Rejected(Reason.OVERSIZED, f"status of {len(data)} bytes")
    try:
        return Status.model_validate_json(data)
    except ValidationError as exc:
        raise Rejected(Reason.MALFORMED, _first_error(exc)) from None


MetricValue = float | int | str | bool | None


def encode_metrics(role: str, sender: str, fields: Mapping[str, MetricValue]) -> bytes:
    """Metrics are a flat JSON object: ``schema``, ``role``, ``id``, ``ts``, then the fields."""
    doc: dict[str, MetricValue] = {"schema": MONITOR_SCHEMA, "role": role, "id": sender}
    doc["ts"] = round(time.time(), 3)
    doc.update(fields)
    return json.dumps(doc, allow_nan=False, default=float).encode()


def decode_metrics(data: bytes) -> dict[str, MetricValue]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise Rejected(Reason.MALFORMED, f"metrics not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Rejected(Reason.MALFORMED, "metrics not an object")
    return doc
