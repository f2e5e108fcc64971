"""The wire schemas: Update and its tensors (msgspec), Announcement, Model, Delta and
the training config (pydantic), Status (JSON). Limits live in the types. No I/O here.
"""

from __future__ import annotations

import time
import typing
from typing import Annotated, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..topics import ID_PATTERN, Role

SCHEMA_VERSION = 1
#: Version of the JSON monitoring payloads (Status, Metrics).
MONITOR_SCHEMA = 1
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
    """One dense tensor of a model, little-endian: float32, float16, or ``u8``: ``lo``
    and ``scale`` as two float64 then one byte ``q`` per value, ``x = lo + scale * q``
    (a quarter of float32, each value within ``scale / 2``)."""

    name: str = Field(min_length=1, max_length=256)
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    dtype: Literal["f32", "f16", "u8"] = "f32"
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
    #: the version the retained delta to ``version`` starts from (none: not known, or
    #: no delta): a child holding another one fetches the whole model at once.
    base: int | None = Field(None, ge=0, le=MAX_COUNTER)
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


#: How a child reaches its node: in its Status, its Reading, and eligibility rules.
Link = Literal["ethernet", "wifi", "cellular", "unknown"]
LINKS: tuple[Link, ...] = typing.get_args(Link)


class Status(_Strict):
    """Liveness and profile of a child, retained, JSON. The LWT is ``online: false``."""

    schema_: int = Field(MONITOR_SCHEMA, alias="schema")
    online: bool
    role: Role = "device"
    id: str = Field("", max_length=64)
    battery: float | None = Field(None, ge=0, le=1)
    charging: bool = True
    link: Link = "unknown"
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


def first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg', 'invalid')}"[:200]
