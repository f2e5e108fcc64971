"""One round of one node: the running aggregate, who answered, and when it may close.

Pure state over the round fold and an injected ``now``: no asyncio, no MQTT, no
clock of its own. The node's shell admits updates and asks ``ready``. One update
per sender per round is folded; a second waits for the next round, and of a
third and the one waiting, the older is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..params import Params
from ..wire import Rejected
from .admission import Admitted
from .fold import Contribution, FoldStats, RoundFold

#: Why a round closed: every expected child answered, quorum reached, deadline passed.
CloseReason = Literal["all", "quorum", "deadline"]


def quorum_target(min_updates: int, quorum: float, expected: int) -> int:
    """Participants needed to close early: ``max(min_updates, ceil(quorum * expected))``."""
    # The epsilon keeps 0.6 * 5 from rounding up to 4 through float error.
    return max(min_updates, math.ceil(quorum * expected - 1e-9))


def apply_delta(params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Params:
    """``params + delta``, a new float32 dict (the old one may still be being published)."""
    return {
        n: np.add(a, delta[n], dtype=np.float32) if n in delta else a for n, a in params.items()
    }


@dataclass
class Round:
    """A round from the node's side: opened at ``version``, folding children's deltas.

    ``selected`` empty is an open round: any online, eligible child may answer.
    ``deadline`` is wall-clock (it travels in the Model); 0 until announced.
    """

    number: int
    version: int
    fold: RoundFold
    min_updates: int = 1
    quorum: float = 1.0
    selected: tuple[str, ...] = ()
    deadline: float = 0.0
    opened_at: float = 0.0
    announced: bool = False
    reannounced: int = 0
    senders: set[str] = field(default_factory=set)
    #: (sender, inc, seq) of every update taken into this round's fold.
    taken: list[tuple[str, int, int]] = field(default_factory=list)
    #: admitted updates waiting to be folded: early for this round, or carried to the next.
    waiting: dict[str, Admitted] = field(default_factory=dict)
    carry: dict[str, Admitted] = field(default_factory=dict)
    #: children whose Status says they declined this round: not waited for.
    declined: set[str] = field(default_factory=set)
    samples: int = 0
    bytes_in: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    fold_s: float = 0.0

    @property
    def updates(self) -> int:
        return self.fold.count

    @property
    def participants(self) -> int:
        return len(self.senders)

    def admit(self, sender: str, ok: Admitted, weight: float) -> Admitted | None:
        """Fold ``ok`` (just measured) if this is the sender's first update of the round;
        else carry it to the next round. Returns what is refused as a repeat beyond
        that: the older of the carried one and this one.

        An update that arrives before the announcement (queued in the node's broker
        session across a restart) folds at once: holding each would cost a model's
        worth of memory per child, and the one-per-sender rule holds either way.
        """
        if sender not in self.senders and sender not in self.waiting:
            self._add(sender, ok, weight, fresh=True)
            return None
        old = self.carry.get(sender)
        if old is not None and (old.update.base, old.update.seq) > (ok.update.base, ok.update.seq):
            return ok
        self.carry[sender] = ok
        return old

    def open_waiting(self, weigh: Callable[[Admitted], float]) -> list[tuple[Admitted, str]]:
        """On announcing: fold the updates that waited. Returns those now too stale."""
        stale = []
        waiting, self.waiting = self.waiting, {}
        for sender, ok in waiting.items():
            try:
                self._add(sender, ok, weigh(ok), fresh=False)
            except Rejected as exc:
                stale.append((ok, exc.detail))
        return stale

    def _add(self, sender: str, ok: Admitted, weight: float, *, fresh: bool) -> None:
        update = ok.update
        self.fold.add(
            Contribution(sender, update.tensors, weight, ok.norm, ok.samples), fresh=fresh
        )
        self.senders.add(sender)
        self.taken.append((sender, update.inc, update.seq))
        self.samples += ok.samples
        staleness = self.version - update.base
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)

    def pool(self, online_eligible: Set[str], online: Set[str]) -> Set[str]:
        """Children still expected to answer: the selected ones still online, or, for an
        open round, every online eligible child."""
        if self.selected:
            return {c for c in self.selected if c in online and c not in self.declined}
        return online_eligible - self.declined if self.declined else online_eligible

    def ready(self, now: float, online_eligible: Set[str], online: Set[str]) -> CloseReason | None:
        """Why the round may close now, or None. Never before the first update.

        The quorum is counted in distinct participants over the expected children
        (still-expected plus those who already answered); a child that went offline
        mid-round stops being waited for, so it cannot stall the round. With no
        child known to be online the round waits for ``min_updates`` or the deadline.
        """
        if not self.announced or self.participants == 0:
            return None
        pool = self.pool(online_eligible, online)
        if pool and self.participants >= len(pool) and pool <= self.senders:
            return "all"
        expected = len(pool) + len(self.senders - pool)
        if self.participants >= quorum_target(self.min_updates, self.quorum, expected):
            return "quorum"
        if now >= self.deadline:
            return "deadline"
        return None

    def may_close(self, online_eligible: Set[str], online: Set[str]) -> bool:
        """A necessary condition for ``ready``, O(selected) rather than O(children): the
        receive path asks it after every update and wakes the driver only when it holds."""
        if not self.announced:
            return False
        pool = len(self.pool(online_eligible, online))
        target = quorum_target(self.min_updates, self.quorum, pool)
        return self.participants >= (min(pool, target) if pool else target)

    def expired(self, now: float) -> bool:
        """Deadline passed with nothing folded: the round must be re-announced."""
        return self.announced and self.participants == 0 and now >= self.deadline

    def average(self) -> tuple[Params, FoldStats]:
        """The (capped, clipped; weighted or robust) average delta and what the rules did."""
        return self.fold.result()

    @property
    def staleness_mean(self) -> float:
        return self.staleness_sum / self.updates if self.updates else 0.0
