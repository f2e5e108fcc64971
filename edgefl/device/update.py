"""What a device sends and what it remembers across reboots, as pure functions.

Delta to signed Update bytes through the round's codec (``edgefl.codecs``: chosen by
uplink and deadline within the round config's limits, with error feedback), and the
progress and residual kept in the outbox's state. No I/O, no asyncio, no torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec
import numpy as np

from .. import codecs
from ..codecs import ErrorFeedback, Plan
from ..config import ConfigError, DeviceSettings
from ..errors import Rejected
from ..params import Params, Spec, from_bytes, to_bytes
from ..wire import QTensor, TrainConfig, Update, encode_update, sign

log = logging.getLogger(__name__)


def float32_bytes(spec: Spec) -> int:
    """The tensor bytes of the same update in float32: the baseline of ``compression``."""
    return 4 * sum(math.prod(shape) for shape in spec.values())


def hmac_key(hex_key: str | None) -> bytes | None:
    """The update-signing key from its hex form; ``ConfigError`` if it is not hex."""
    if hex_key is None:
        return None
    try:
        key = bytes.fromhex(hex_key)
    except ValueError:
        raise ConfigError("hmac_key: expected an even number of hex digits") from None
    if not key:
        raise ConfigError("hmac_key: empty key")
    return key


def is_finite(params: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(a).all()) for a in params.values())


class UpdateEncoder:
    """Delta -> wire tensors -> signed, encoded Update, keeping what was not sent.

    ``choose`` picks the round's codec (``plan``) before it trains; ``tensors`` runs
    once per round (the error feedback residual moves on); ``encode`` may run again
    for the same tensors (it only numbers and signs them).
    """

    def __init__(self, settings: DeviceSettings, residual: Params | None = None) -> None:
        self.sender = settings.id
        self.codec = settings.update_codec
        self.fraction = settings.topk_fraction
        self.stochastic = settings.stochastic_rounding
        self.error_feedback = settings.error_feedback
        self.seed = settings.seed
        self.key = hmac_key(settings.hmac_key)
        self.feedback = ErrorFeedback(residual if self.error_feedback else None)
        # Until ``choose``: the configured codec, or u8 for auto (no uplink figure yet).
        self.plan = (
            Plan("u8", 1.0, 0) if self.codec == "auto" else Plan(self.codec, self.fraction, 0)
        )

    def choose(
        self, spec: Spec, config: TrainConfig, kbps: float | None, seconds: float | None
    ) -> Plan:
        """The codec and k for this round from the uplink (kbps) and the time left."""
        self.plan = codecs.plan(
            spec,
            prefer=self.codec,
            allowed=config.codecs,
            min_fraction=config.min_fraction,
            fraction=self.fraction,
            kbps=kbps,
            seconds=seconds,
        )
        return self.plan

    def tensors(self, delta: Params, round_: int) -> list[QTensor]:
        plan = self.plan
        rng = np.random.default_rng([self.seed, round_]) if self.stochastic else None
        if not self.error_feedback:
            return codecs.encode_params(delta, plan.codec, fraction=plan.fraction, rng=rng)
        return self.feedback.encode(delta, plan.codec, fraction=plan.fraction, rng=rng)

    def encode(
        self,
        tensors: list[QTensor],
        *,
        seq: int,
        round_: int,
        base: int,
        n: int,
        metrics: Mapping[str, float],
        inc: int = 0,
        low: int = 0,
    ) -> bytes:
        """The signed Update bytes; ``inc`` is the outbox's incarnation, by which a node
        tells this device's seqs from those of an earlier (lost) outbox."""
        update = Update(
            sender=self.sender,
            seq=seq,
            round=round_,
            base=base,
            n=int(n),  # a task may count its samples in a numpy integer
            metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
            tensors=tensors,
            inc=inc,
            low=low,
        )
        return encode_update(sign(update, self.key) if self.key else update)


@dataclass
class Progress:
    """What a restarted device must remember, kept under one outbox state key.

    ``trained`` is the last (round, version) trained, ``model_version`` the last
    model seen (for Status), ``residual`` the error feedback carried forward.
    """

    trained: tuple[int, int] | None = None
    model_version: int | None = None
    residual: Params = field(default_factory=dict)

    def dump(self) -> bytes:
        return msgspec.msgpack.encode(
            {
                "trained": list(self.trained) if self.trained else None,
                "model_version": self.model_version,
                "residual": to_bytes(self.residual),
            }
        )

    @classmethod
    def load(cls, data: bytes | None) -> Progress:
        """What ``dump`` wrote; a damaged record is logged and a fresh progress returned
        (the residual is lost, and a round may be trained again: its seq is new)."""
        if not data:
            return cls()
        try:
            doc = msgspec.msgpack.decode(data, type=_Saved)
            residual = from_bytes(doc.residual) if doc.residual else {}
        except (msgspec.DecodeError, msgspec.ValidationError, Rejected) as exc:
            log.warning("the saved progress is unreadable (%s): starting afresh", exc)
            return cls()
        trained = doc.trained
        return cls((trained[0], trained[1]) if trained else None, doc.model_version, residual)


class _Saved(msgspec.Struct):
    trained: tuple[int, int] | None = None
    model_version: int | None = None
    residual: bytes = b""
