"""Who may train this round: the children's retained Status, the policy, fair selection.

Pure: the node's shell feeds Status messages in and asks for a selection; nothing
here reads a clock, publishes or sleeps.
"""

from __future__ import annotations

import random
import statistics
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Set

from .. import codecs
from ..config import AggregatorSettings
from ..params import Spec
from ..profiles import Decision, EligibilityPolicy, policy_of
from ..wire import MAX_COUNTER, Status


class Children:
    """The children a node knows from their retained Status, and which may train.

    A child is *known* once it published a Status (the unknown-sender check when no
    allow-list is configured); with ``allowed`` (the allow-list and the ids holding
    keys) other ids' statuses are ignored. It is *online* while its last Status says
    so (the LWT flips it), and *eligible* when it says so and the node's policy
    agrees: battery, link, and an uplink fast enough for ``expected_bytes`` by the
    deadline. A child waited for in vain ``max_misses`` rounds in a row is no longer
    waited for (it may still be selected) until it delivers an update. At most
    ``max_children`` are kept: offline ones, then ones that never delivered, go first.
    Its weight bound is the sample count it declared first, capped by ``max_samples``.
    """

    def __init__(
        self,
        policy: EligibilityPolicy,
        *,
        expected_bytes: int = 0,
        deadline_s: float | None = None,
        min_uplink_kbps: float = 0.0,
        allowed: frozenset[str] | None = None,
        max_children: int = 10_000,
        max_misses: int = 3,
        max_samples: int = 100_000,
        sample_ratio: float = 0.0,
    ) -> None:
        self.policy = policy
        self.expected_bytes = expected_bytes
        self.deadline_s = deadline_s
        self.min_uplink_kbps = min_uplink_kbps
        self.allowed = allowed or None
        self.max_children = max_children
        self.max_misses = max_misses
        self.max_samples = max_samples
        self.sample_ratio = sample_ratio
        self._median: float | None = None  # of the declared counts; None: to recompute
        self.status: OrderedDict[str, Status | None] = OrderedDict()
        self.delivered: set[str] = set()
        self.declared: dict[str, int] = {}
        self.misses: dict[str, int] = {}
        self.ignored = 0  # statuses refused: not allowed, or the table full
        self._online: set[str] = set()
        self._eligible: set[str] = set()
        self._selectable: set[str] = set()

    @classmethod
    def from_settings(
        cls, settings: AggregatorSettings, spec: Spec, allowed: frozenset[str] | None = None
    ) -> Children:
        """Judged like the devices judge themselves: whether the smallest update the round
        config lets them send (``codecs.least_bytes``) goes out by the deadline."""
        train = settings.train
        return cls(
            policy_of(settings.policy),
            expected_bytes=codecs.least_bytes(spec, train.codecs, train.min_fraction),
            deadline_s=settings.train.deadline_s,
            min_uplink_kbps=settings.policy.min_uplink_kbps,
            allowed=allowed,
            max_children=settings.max_children,
            max_misses=settings.max_misses,
            max_samples=settings.max_samples,
            sample_ratio=settings.max_sample_ratio,
        )

    def __contains__(self, child: object) -> bool:
        return child in self.status

    def __len__(self) -> int:
        return len(self.status)

    @property
    def known(self) -> Set[str]:
        return self.status.keys()

    def remember(self, children: Iterable[str]) -> None:
        """Children known before a restart: after a reconnect, updates queued in the
        broker session arrive before the retained statuses that introduce them."""
        for child in children:
            if child not in self.status and self._room(child):
                self.status[child] = None

    def is_device(self, child: str) -> bool:
        """Whether ``child`` is a device (not a gateway, by its Status; unknown: a device)."""
        status = self.status.get(child)
        return status is None or status.role == "device"

    def bound(self, child: str) -> int:
        """The most samples ``child``'s update may weigh: what it declared first, at most
        ``max_samples`` and ``sample_ratio`` times the median of what the children declared
        (a minority of liars cannot move the median)."""
        bound = min(self.declared.get(child, self.max_samples), self.max_samples)
        if self.sample_ratio > 0 and self.declared:
            if self._median is None:
                self._median = float(statistics.median(self.declared.values()))
            bound = min(bound, max(1, int(self.sample_ratio * self._median)))
        return bound

    def update(self, child: str, status: Status | None) -> bool:
        """Record a child's Status; None (an emptied retained topic) forgets the child.
        False if the status was ignored (not an allowed id, or no room left)."""
        if self.allowed is not None and child not in self.allowed:
            self.ignored += 1
            return False
        self._online.discard(child)
        self._eligible.discard(child)
        self._selectable.discard(child)
        if status is None:
            self.status.pop(child, None)
            for table in (self.misses, self.declared):
                table.pop(child, None)
            self._median = None
            self.delivered.discard(child)
            return True
        if child not in self.status and not self._room(child):
            self.ignored += 1
            return False
        self.status[child] = status
        self.status.move_to_end(child)
        if status.samples is not None and status.samples < self.declared.get(child, MAX_COUNTER):
            self.declared[child] = status.samples  # at registration; lowered, never raised
            self._median = None
        if status.online:
            self._mark_online(child, status)
        return True

    def _mark_online(self, child: str, status: Status) -> None:
        eligible = self.decide(status).ok
        if eligible:
            self._selectable.add(child)
        if self.misses.get(child, 0) >= self.max_misses:
            return  # not waited for until it delivers
        self._online.add(child)
        if eligible:
            self._eligible.add(child)

    def _room(self, child: str) -> bool:
        """Make room for one more child by evicting; False if none may go."""
        if len(self.status) < self.max_children:
            return True
        victim = next((c for c, st in self.status.items() if st is None or not st.online), None)
        if victim is None:
            victim = next((c for c in self.status if c not in self.delivered), None)
        if victim is None:
            return False
        self.update(victim, None)
        return True

    def answered(self, child: str) -> None:
        """``child`` delivered a valid update: it is waited for again."""
        self.delivered.add(child)
        if self.misses.pop(child, 0) >= self.max_misses:
            status = self.status.get(child)
            if status is not None and status.online:
                self._mark_online(child, status)

    def round_closed(self, expected: Iterable[str], answered: Set[str]) -> None:
        """Count a miss for every expected child that did not answer."""
        for child in list(expected):  # often a live view of the sets changed below
            if child in answered:
                continue
            misses = self.misses[child] = self.misses.get(child, 0) + 1
            if misses == self.max_misses:
                self._online.discard(child)
                self._eligible.discard(child)

    def decide(self, status: Status) -> Decision:
        if not status.eligible:
            return Decision(False, status.reason or "not_eligible")
        kbps = status.uplink_kbps
        if kbps is not None and kbps < self.min_uplink_kbps:
            return Decision(False, "uplink_too_slow")
        return self.policy.decide(
            status, expected_bytes=self.expected_bytes, deadline_s=self.deadline_s
        )

    # Live views, not copies: the receive path asks for them on every update.
    @property
    def online(self) -> Set[str]:
        """Online children that are waited for."""
        return self._online

    @property
    def online_eligible(self) -> Set[str]:
        """Online, eligible children that are waited for."""
        return self._eligible

    @property
    def selectable(self) -> Set[str]:
        """Online, eligible children, including those no longer waited for."""
        return self._selectable


def select(
    candidates: Iterable[str],
    last_selected: Mapping[str, int],
    per_round: int,
    *,
    seed: int,
    round: int,
) -> tuple[str, ...]:
    """Up to ``per_round`` candidates, least recently selected first, sorted by id.

    Never-selected children come first; ties break by a shuffle seeded with
    ``(seed, round)`` so that a run replays and equal children take turns.
    ``per_round`` 0 means an open round: nobody is singled out.
    """
    if per_round <= 0:
        return ()
    pool = sorted(set(candidates))
    rng = random.Random(f"{seed}:{round}")
    tie = {c: rng.random() for c in pool}
    ranked = sorted(pool, key=lambda c: (last_selected.get(c, -1), tie[c]))
    return tuple(sorted(ranked[:per_round]))
