"""Eligibility: may this node train this round? The same rules on device and node.

Pure decisions over readings or Status payloads; never reads the OS itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

from .reading import LINKS, Link

if TYPE_CHECKING:
    from ..config import PolicySettings

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ eligibility

OK = "ok"
BATTERY_LOW = "battery_low"
NOT_CHARGING = "not_charging"
LINK_NOT_ALLOWED = "link_not_allowed"
TOO_HOT = "too_hot"
LOW_MEMORY = "low_memory"
DUTY_CYCLE = "duty_cycle"
ENERGY_BUDGET = "energy_budget"
UPLINK_TOO_SLOW = "uplink_too_slow"
REASONS = (
    OK,
    BATTERY_LOW,
    NOT_CHARGING,
    LINK_NOT_ALLOWED,
    TOO_HOT,
    LOW_MEMORY,
    DUTY_CYCLE,
    ENERGY_BUDGET,
    UPLINK_TOO_SLOW,
)


class HasProfile(Protocol):
    """What the policy needs: a Reading, or the ``wire.Status`` a child published."""

    @property
    def battery(self) -> float | None: ...
    @property
    def charging(self) -> bool: ...
    @property
    def link(self) -> str: ...
    @property
    def uplink_kbps(self) -> float | None: ...


@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


class EligibilityPolicy(BaseModel):
    """Whether a node should train this round; devices and aggregators share it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_battery: float = Field(0.3, ge=0, le=1, description="lowest level; ignored when charging")
    allowed_links: tuple[Link, ...] = Field(LINKS, description="link types allowed to train")
    max_temp_c: float | None = Field(80.0, description="CPU temperature cap; None disables")
    min_mem_mb: float = Field(0.0, ge=0, description="least available memory in MiB")
    prefer_charging: bool = Field(False, description="on battery, train only when charged")
    charged_battery: float = Field(0.9, ge=0, le=1, description="what charged means then")
    max_rounds_per_hour: int = Field(0, ge=0, description="duty cycle; 0: no cap")
    daily_energy_j: float = Field(0.0, ge=0, description="joules per rolling 24 h; 0: none")

    def decide(
        self,
        profile: HasProfile,
        *,
        expected_bytes: int = 0,
        deadline_s: float | None = None,
        rounds_last_hour: int | None = None,
        energy_day_j: float | None = None,
    ) -> Decision:
        """The first failed check, in the order of ``REASONS``; unknown values pass.

        ``not_charging``: with ``prefer_charging``, on battery below ``charged_battery``.
        ``duty_cycle`` and ``energy_budget``: the device's own counts (``rounds_last_hour``
        trained, ``energy_day_j`` spent in the last 24 h) reached the caps; a node
        judging a child's Status has neither. ``uplink_too_slow``: ``expected_bytes``
        would not be sent by ``deadline_s`` at the known ``uplink_kbps``. Temperature
        and memory are read only if the profile has them (a ``Status`` does not).
        """
        battery = profile.battery
        if not profile.charging and battery is not None and battery < self.min_battery:
            return Decision(False, BATTERY_LOW)
        charged = battery is None or battery >= self.charged_battery
        if self.prefer_charging and not profile.charging and not charged:
            return Decision(False, NOT_CHARGING)
        if profile.link not in self.allowed_links:
            return Decision(False, LINK_NOT_ALLOWED)
        temp = getattr(profile, "cpu_temp_c", None)
        if self.max_temp_c is not None and temp is not None and temp > self.max_temp_c:
            return Decision(False, TOO_HOT)
        mem = getattr(profile, "mem_available_mb", None)
        if mem is not None and mem < self.min_mem_mb:
            return Decision(False, LOW_MEMORY)
        cap = self.max_rounds_per_hour
        if cap and rounds_last_hour is not None and rounds_last_hour >= cap:
            return Decision(False, DUTY_CYCLE)
        budget = self.daily_energy_j
        if budget and energy_day_j is not None and energy_day_j >= budget:
            return Decision(False, ENERGY_BUDGET)
        kbps = profile.uplink_kbps
        if deadline_s is None or expected_bytes <= 0 or kbps is None:
            return Decision(True, OK)
        if kbps <= 0 or expected_bytes * 8 / 1000 / kbps > deadline_s:
            return Decision(False, UPLINK_TOO_SLOW)
        return Decision(True, OK)


def policy_of(settings: PolicySettings) -> EligibilityPolicy:
    """The policy a role's ``[policy]`` settings describe: the device applies it to
    itself, an aggregation node to its children's Status."""
    return EligibilityPolicy(
        min_battery=settings.min_battery,
        allowed_links=tuple(settings.allowed_links),
        max_temp_c=settings.max_temp_c,
        prefer_charging=settings.prefer_charging,
        charged_battery=settings.charged_battery,
        max_rounds_per_hour=settings.max_rounds_per_hour,
        daily_energy_j=settings.daily_energy_j,
    )
