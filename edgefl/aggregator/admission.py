"""Admission of children's updates: every check between raw bytes and the fold.

``UpdateGate.admit`` turns untrusted bytes into an accepted update with its
staleness weight, or raises ``UpdateRejected`` with the reason. Pure apart from
the per-sender last seq it keeps; it never folds, logs or touches the network.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import AggregatorSettings
from ..fedavg import StalenessKind, staleness_weight
from ..params import Spec
from ..wire import QTensor, Reason, Update, UpdateRejected, decode_update, verify

log = logging.getLogger("edgefl.aggregator")
#: (sender, reason) pairs remembered for log-once; beyond this, rejections are only counted.
MAX_LOGGED = 10_000

_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Admitted:
    """An update that passed every check, and the weight it folds with."""

    update: Update
    staleness: int
    weight: float


def squared_norm(tensors: Sequence[QTensor]) -> float:
    """``||lo + scale*q||^2`` of a delta as it will be folded, in float32 (a bound, not a sum).

    One temporary float32 copy of one tensor at a time; float32 is plenty to compare
    against a norm limit.
    """
    total = 0.0
    for t in tensors:
        if t.dtype == "f32":
            x = np.frombuffer(t.q, dtype="<f4")
        else:
            q = np.frombuffer(t.q, dtype=np.uint8)
            x = np.multiply(q, np.float32(t.scale), dtype=np.float32)
            x += np.float32(t.lo)
        total += float(np.dot(x, x))
    return total


def dequantized_finite(tensors: Sequence[QTensor]) -> bool:
    """Whether every ``lo + scale*q`` stays a finite float32 (f32 tensors are checked at decode).

    ``lo`` and ``scale >= 0`` are finite already, so the extremes are ``lo`` and
    ``lo + 255*scale``; plain floats keep this off numpy's per-call overhead.
    """
    return all(
        t.dtype != "u8" or (abs(t.lo) <= _F32_MAX and abs(t.lo + 255.0 * t.scale) <= _F32_MAX)
        for t in tensors
    )


class UpdateGate:
    """Decodes and checks children's updates in the order of the design's rejection list.

    Checks: decode (malformed, oversized, shape, non-finite ``lo``/``scale``),
    topic sender and allow-list (unknown_sender), ``seq`` not above the last one
    accepted from that sender (duplicate), ``0 <= version - base <= max_staleness``
    (stale), signature (bad_signature), dequantized values and norm (nonfinite,
    norm). ``last_seq`` moves only when an update is admitted, so a rejected
    update never shadows a later valid one.
    """

    def __init__(
        self,
        spec: Spec,
        *,
        max_bytes: int,
        max_staleness: int,
        staleness: StalenessKind = "polynomial",
        staleness_a: float = 0.5,
        staleness_b: int = 4,
        keys: Mapping[str, bytes] | None = None,
        require_signature: bool = False,
        max_norm: float | None = None,
        allowed: frozenset[str] | None = None,
        last_seq: Mapping[str, int] | None = None,
    ) -> None:
        self.spec = spec
        self.max_bytes = max_bytes
        self.max_staleness = max_staleness
        self._weights = [
            staleness_weight(s, staleness, staleness_a, staleness_b)
            for s in range(max_staleness + 1)
        ]
        self.keys = dict(keys or {})
        self.require_signature = require_signature
        self.max_norm = max_norm
        self.allowed = allowed or None
        self.last_seq: dict[str, int] = dict(last_seq or {})

    @classmethod
    def from_settings(cls, settings: AggregatorSettings, spec: Spec) -> UpdateGate:
        return cls(
            spec,
            max_bytes=settings.max_update_bytes,
            max_staleness=settings.max_staleness,
            staleness=settings.staleness,
            staleness_a=settings.staleness_a,
            staleness_b=settings.staleness_b,
            keys={child: bytes.fromhex(k) for child, k in settings.keys.items()},
            require_signature=settings.require_signature,
            max_norm=settings.max_update_norm,
            allowed=frozenset(settings.children) or None,
        )

    def admit(
        self,
        payload: bytes,
        topic_sender: str,
        version: int,
        known: Callable[[str], bool] = lambda _: True,
    ) -> Admitted:
        """Check one update received on ``.../update/{topic_sender}`` at model ``version``."""
        update = decode_update(payload, self.spec, max_bytes=self.max_bytes)
        sender = update.sender
        if sender != topic_sender:
            raise UpdateRejected(
                Reason.UNKNOWN_SENDER, f"sender {sender!r} on the topic of {topic_sender!r}"
            )
        if not (sender in self.allowed if self.allowed is not None else known(sender)):
            raise UpdateRejected(Reason.UNKNOWN_SENDER, f"{sender!r} is not a known child")
        last = self.last_seq.get(sender, -1)
        if update.seq <= last:
            raise UpdateRejected(Reason.DUPLICATE, f"seq {update.seq} <= {last}")
        staleness = version - update.base
        if not 0 <= staleness <= self.max_staleness:
            raise UpdateRejected(
                Reason.STALE, f"base {update.base} at version {version} (max {self.max_staleness})"
            )
        self._check_signature(update)
        if not dequantized_finite(update.tensors):
            raise UpdateRejected(Reason.NONFINITE, "lo + scale*q overflows float32")
        if self.max_norm is not None:
            norm = math.sqrt(squared_norm(update.tensors))
            if not norm <= self.max_norm:
                raise UpdateRejected(Reason.NORM, f"norm {norm:.4g} > {self.max_norm:.4g}")
        self.last_seq[sender] = update.seq
        return Admitted(update, staleness, update.n * self._weights[staleness])

    def _check_signature(self, update: Update) -> None:
        key = self.keys.get(update.sender, self.keys.get("*"))
        if key is not None:
            verify(update, key)
        elif self.require_signature:
            raise UpdateRejected(Reason.BAD_SIGNATURE, "no key for this sender")


class Rejections:
    """Rejected updates counted by reason, each (sender, reason) logged once at WARNING."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.counts: Counter[Reason] = Counter()
        self._logged: set[tuple[str, Reason]] = set()

    def add(self, sender: str, exc: UpdateRejected) -> None:
        self.counts[exc.reason] += 1
        key = (sender[:64], exc.reason)
        if key in self._logged or len(self._logged) >= MAX_LOGGED:
            return
        self._logged.add(key)
        log.warning(
            "%s: update from %r rejected (%s): %s; further ones are only counted",
            self.node,
            key[0],
            exc.reason.value,
            exc.detail,
        )
