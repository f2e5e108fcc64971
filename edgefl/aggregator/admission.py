"""Admission of children's updates: every check between raw bytes and the fold.

``UpdateGate.admit`` turns untrusted bytes into an accepted update with its capped
sample count and norm, or raises ``Rejected`` with the reason. Pure apart
from the ledger of taken updates; it never folds or touches the network.
``Rejections`` counts and logs what was refused, in bounded log lines.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .. import codecs
from ..codecs.topk import kept
from ..config import AggregatorSettings
from ..fedavg import StalenessKind, staleness_weight
from ..params import Spec
from ..wire import (
    MAX_COUNTER,
    QTensor,
    Reason,
    Rejected,
    Update,
    check_tensors,
    decode_update,
    verify,
)
from .ledger import Ledger

log = logging.getLogger(__name__)
#: (sender, reason) pairs of known children remembered for log-once.
MAX_LOGGED = 10_000
#: Unknown senders logged one by one; past this, one summary line per reason and period.
MAX_LOGGED_UNKNOWN = 20
SUMMARY_S = 60.0

#: Deltas with a longer L2 norm are refused as non-finite: with weights up to 2**53 and
#: 64 updates summed per float32 block, the fold then stays below float32's range.
FOLD_NORM_LIMIT = 1e15


@dataclass(frozen=True)
class Admitted:
    """An update that passed every check, its sample count as capped, and its norm."""

    update: Update
    samples: int
    norm: float


class UpdateGate:
    """Decodes and checks children's updates in the order of the design's rejection list.

    Checks: decode (malformed, oversized), topic sender and allow-list
    (unknown_sender), signature (bad_signature, before anything that trusts the
    content), ``(inc, seq)`` taken or settled already (duplicate),
    ``0 <= version - base <= max_staleness`` (stale), then the content: sizes and
    shapes (shape), finite ``lo``/``scale``/values and norm (nonfinite; above the
    absolute ``max_norm`` or absurd: norm). A content rejection is settled: the
    sender's receipt covers it; a stale one is not (see ``admit``). The sample count
    is capped by ``bound(sender)``.
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
        ledger: Ledger | None = None,
        allowed_codecs: Sequence[str] = ("u8", "topk", "f32", "f16"),
        min_fraction: float = 0.0,
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
        self.ledger = ledger if ledger is not None else Ledger()
        #: the round config's limits on what a child sends: its codecs, and k for a sparse one
        self.allowed_codecs = frozenset(allowed_codecs)
        self.min_fraction = min_fraction
        #: (sender, inc, seq) of the last update refused for good, for the caller's log.
        self.refused: tuple[str, int, int] | None = None

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
            ledger=Ledger(settings.max_children),
            allowed_codecs=settings.train.codecs,
            min_fraction=settings.train.min_fraction,
        )

    @property
    def credentialed(self) -> frozenset[str] | None:
        """The only children that may exist, when the settings say: the allow-list, or with
        signatures required and no ``*`` key, the ids holding a key. None: any id."""
        if self.allowed is not None:
            return self.allowed
        if self.require_signature and self.keys and "*" not in self.keys:
            return frozenset(self.keys)
        return None

    def weight(self, admitted: Admitted, version: int) -> float:
        """The FedAvg weight at model ``version``: capped samples times the staleness factor."""
        staleness = version - admitted.update.base
        if not 0 <= staleness <= self.max_staleness:
            raise Rejected(Reason.STALE, f"base {admitted.update.base} at version {version}")
        return admitted.samples * self._weights[staleness]

    def admit(
        self,
        payload: bytes,
        topic_sender: str,
        version: int,
        known: Callable[[str], bool] = lambda _: True,
        *,
        bound: Callable[[str], int] = lambda _: MAX_COUNTER,
        measure: Callable[[Sequence[QTensor]], float] | None = None,
        absurd: float = math.inf,
        settles_stale: Callable[[str], bool] = lambda _: True,
    ) -> Admitted:
        """Check one update received on ``.../update/{topic_sender}`` at model ``version``.

        ``bound`` caps a sender's sample count, ``measure`` gives a delta's norm and
        ``absurd`` is the norm above which a delta is refused rather than clipped."""
        update = decode_update(payload, max_bytes=self.max_bytes, check=False)
        sender = update.sender
        if sender != topic_sender:
            raise Rejected(
                Reason.UNKNOWN_SENDER, f"sender {sender!r} on the topic of {topic_sender!r}"
            )
        if not (sender in self.allowed if self.allowed is not None else known(sender)):
            raise Rejected(Reason.UNKNOWN_SENDER, f"{sender!r} is not a known child")
        self._check_signature(update)
        self.ledger.note_low(sender, update.inc, min(update.low, update.seq))
        if self.ledger.seen(sender, update.inc, update.seq):
            raise Rejected(Reason.DUPLICATE, f"seq {update.seq} (inc {update.inc}) again")
        staleness = version - update.base
        if not 0 <= staleness <= self.max_staleness:
            # Settled for a device, which may then forget it; not for a node's sync: a
            # gateway tells a folded sync from a stale one by its receipt, and merges a
            # stale one's work into its next sync, whose ``low`` passes this seq.
            if settles_stale(sender):
                self.ledger.settle(sender, update.inc, update.seq)
            self.refused = (sender, update.inc, update.seq)
            raise Rejected(
                Reason.STALE, f"base {update.base} at version {version} (max {self.max_staleness})"
            )
        try:
            norm = self._check_content(update, measure, absurd)
        except Rejected as exc:
            # Broken for good, from its (authenticated) sender: settled, so that its
            # receipt lets the child forget it instead of resending it for ever. Not a
            # norm refusal: a gateway's sync refused so must not pass for folded.
            if exc.reason is not Reason.NORM:
                self.ledger.settle(sender, update.inc, update.seq)
            self.refused = (sender, update.inc, update.seq)
            raise
        self.ledger.take(sender, update.inc, update.seq)
        return Admitted(update, max(1, min(update.n, bound(sender))), norm)

    def _check_content(
        self,
        update: Update,
        measure: Callable[[Sequence[QTensor]], float] | None,
        absurd: float,
    ) -> float:
        """Sizes, shapes, finite values and the norm; returns the norm."""
        for t in update.tensors:
            if t.codec not in self.allowed_codecs:
                raise Rejected(Reason.MALFORMED, f"{t.name}: codec {t.codec[:16]!r} not allowed")
        check_tensors(update, self.spec)
        for t in update.tensors:
            count = math.prod(t.shape)
            if codecs.get(t.codec).values(t) < kept(count, self.min_fraction):
                raise Rejected(Reason.SHAPE, f"{t.name}: fewer values than {self.min_fraction:g}")
        norm = measure(update.tensors) if measure is not None else 0.0
        if not norm <= FOLD_NORM_LIMIT:
            raise Rejected(Reason.NONFINITE, f"norm {norm:.3g} would overflow the fold")
        if self.max_norm is not None and not norm <= self.max_norm:
            raise Rejected(Reason.NORM, f"norm {norm:.4g} > {self.max_norm:.4g}")
        if not norm <= absurd:
            raise Rejected(Reason.NORM, f"norm {norm:.4g} > {absurd:.4g}, absurd")
        return norm

    def _check_signature(self, update: Update) -> None:
        key = self.keys.get(update.sender, self.keys.get("*"))
        if key is not None:
            verify(update, key)
        elif self.require_signature:
            raise Rejected(Reason.BAD_SIGNATURE, "no key for this sender")


class Rejections:
    """Refused messages counted by reason, logged at WARNING in bounded lines.

    A redelivery (``duplicate``: the transport is at-least-once, and children resend
    what was not receipted) is no rejection: it is counted in ``redelivered`` only.
    A known child's (sender, reason) is logged once. Unknown senders (random ids
    cost an attacker nothing) get ``MAX_LOGGED_UNKNOWN`` lines in all; after that,
    one summary line per reason every ``SUMMARY_S`` with how many and from how many.
    """

    def __init__(self, node: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.counts: Counter[Reason] = Counter()
        self.redelivered = 0
        self._clock = clock
        self._logged: set[tuple[str, Reason]] = set()
        self._unknown_logged = 0
        self._quiet: Counter[Reason] = Counter()
        self._quiet_senders: dict[Reason, set[str]] = {}
        self._summary_at = clock() + SUMMARY_S

    def add(self, sender: str, exc: Rejected, *, known: bool = True) -> None:
        if exc.reason is Reason.DUPLICATE:
            self.redelivered += 1
            return
        self.counts[exc.reason] += 1
        key = (sender[:64], exc.reason)
        if key in self._logged:
            return
        if known and len(self._logged) < MAX_LOGGED:
            self._logged.add(key)
            self._warn(key, exc)
        elif not known and self._unknown_logged < MAX_LOGGED_UNKNOWN:
            self._unknown_logged += 1
            self._logged.add(key)
            self._warn(key, exc)
        else:
            self._quiet[exc.reason] += 1
            senders = self._quiet_senders.setdefault(exc.reason, set())
            if len(senders) < 1000:
                senders.add(key[0])
        self.summarize()

    def _warn(self, key: tuple[str, Reason], exc: Rejected) -> None:
        log.warning(
            "%s: message from %r rejected (%s): %s; further ones are only counted",
            self.node,
            key[0],
            exc.reason.value,
            exc.detail,
        )

    def summarize(self) -> None:
        """Log what was only counted since the last summary, once its period is over."""
        now = self._clock()
        if now < self._summary_at:
            return
        self._summary_at = now + SUMMARY_S
        for reason, count in sorted(self._quiet.items()):
            senders = self._quiet_senders.get(reason, set())
            many = f"{len(senders)}+" if len(senders) >= 1000 else str(len(senders))
            log.warning(
                "%s: %d more messages rejected (%s) from %s senders, e.g. %r",
                self.node,
                count,
                reason.value,
                many,
                min(senders) if senders else "?",
            )
        self._quiet.clear()
        self._quiet_senders.clear()
