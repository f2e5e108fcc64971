"""Who may train this round: the children's retained Status, the policy, fair selection.

Pure: the node's shell feeds Status messages in and asks for a selection; nothing
here reads a clock, publishes or sleeps.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Set

from ..config import AggregatorSettings
from ..profiles import Decision, EligibilityPolicy, policy_of
from ..wire import Status


class Children:
    """The children a node knows from their retained Status, and which may train.

    A child is *known* once it published any Status (the unknown-sender check
    when no allow-list is configured), *online* while its last Status says so
    (the LWT flips it), and *eligible* when it says so and the node's policy
    agrees: battery, link, and an uplink fast enough for ``expected_bytes`` by
    the deadline.
    """

    def __init__(
        self,
        policy: EligibilityPolicy,
        *,
        expected_bytes: int = 0,
        deadline_s: float | None = None,
        min_uplink_kbps: float = 0.0,
    ) -> None:
        self.policy = policy
        self.expected_bytes = expected_bytes
        self.deadline_s = deadline_s
        self.min_uplink_kbps = min_uplink_kbps
        self.status: dict[str, Status] = {}
        self._known: set[str] = set()
        self._online: set[str] = set()
        self._eligible: set[str] = set()

    @classmethod
    def from_settings(cls, settings: AggregatorSettings, parameters: int) -> Children:
        """Judged like the devices judge themselves: the update they would send by the
        deadline, at ``parameters`` values of the update dtype's width."""
        width = 1 if settings.update_dtype == "u8" else 4
        return cls(
            policy_of(settings.policy),
            expected_bytes=parameters * width,
            deadline_s=settings.train.deadline_s,
            min_uplink_kbps=settings.policy.min_uplink_kbps,
        )

    def __contains__(self, child: object) -> bool:
        return child in self._known

    def __len__(self) -> int:
        return len(self._known)

    @property
    def known(self) -> Set[str]:
        return self._known

    def remember(self, children: Iterable[str]) -> None:
        """Children known before a restart: after a reconnect, updates queued in the
        broker session arrive before the retained statuses that introduce them."""
        self._known.update(children)

    def update(self, child: str, status: Status | None) -> None:
        """Record a child's Status; None (an emptied retained topic) forgets the child."""
        self._online.discard(child)
        self._eligible.discard(child)
        if status is None:
            self.status.pop(child, None)
            self._known.discard(child)
            return
        self.status[child] = status
        self._known.add(child)
        if status.online:
            self._online.add(child)
            if self.decide(status).ok:
                self._eligible.add(child)

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
        return self._online

    @property
    def online_eligible(self) -> Set[str]:
        return self._eligible


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
