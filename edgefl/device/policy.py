"""Whether a device takes part in a round: selection, deadline, then eligibility.

The same EligibilityPolicy the aggregator applies when it selects, evaluated by
the device on its own, fresher reading. Pure: the caller passes the clock's time.
"""

from __future__ import annotations

from ..config import PolicySettings
from ..profiles import UPLINK_TOO_SLOW, Decision, EligibilityPolicy, Reading, policy_of
from ..wire import Announcement

DEADLINE_PASSED = "deadline_passed"
#: The node's model does not fit this device's task: it cannot train until one does.
MODEL_MISMATCH = "model_mismatch"
__all__ = ["DEADLINE_PASSED", "MODEL_MISMATCH", "decide", "policy_of", "selected"]


def selected(model: Announcement, device_id: str) -> bool:
    """An empty selection asks every eligible child."""
    return not model.selected or device_id in model.selected


def decide(
    policy: EligibilityPolicy,
    settings: PolicySettings,
    reading: Reading,
    *,
    expected_bytes: int,
    deadline: float = 0.0,
    now: float = 0.0,
    rounds_last_hour: int | None = None,
    energy_day_j: float | None = None,
) -> Decision:
    """The verdict for a round closing at ``deadline`` (unix seconds; 0: no deadline).

    A passed deadline declines; otherwise the policy decides, with the upload's
    time checked against what is left, and the configured floor on uplink speed;
    ``rounds_last_hour`` and ``energy_day_j`` are the device's own duty-cycle and
    energy counts.
    """
    deadline_s = None
    if deadline > 0:
        deadline_s = deadline - now
        if deadline_s <= 0:
            return Decision(False, DEADLINE_PASSED)
    decision = policy.decide(
        reading,
        expected_bytes=expected_bytes,
        deadline_s=deadline_s,
        rounds_last_hour=rounds_last_hour,
        energy_day_j=energy_day_j,
    )
    kbps = reading.uplink_kbps
    if decision.ok and kbps is not None and kbps < settings.min_uplink_kbps:
        return Decision(False, UPLINK_TOO_SLOW)
    return decision
