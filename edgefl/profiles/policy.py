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
LINK_NOT_ALLOWED = "link_not_allowed"
TOO_HOT = "too_hot"
LOW_MEMORY = "low_memory"
UPLINK_TOO_SLOW = "uplink_too_slow"
REASONS = (OK, BATTERY_LOW, LINK_NOT_ALLOWED, TOO_HOT, LOW_MEMORY, UPLINK_TOO_SLOW)


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

    def decide(
        self, profile: HasProfile, *, expected_bytes: int = 0, deadline_s: float | None = None
    ) -> Decision:
        """The first failed check, in the order of ``REASONS``; unknown values pass.

        ``uplink_too_slow``: ``expected_bytes`` would not be sent by ``deadline_s``
        at the known ``uplink_kbps``. Temperature and memory are read only if the
        profile has them (a ``Status`` does not).
        """
        battery = profile.battery
        if not profile.charging and battery is not None and battery < self.min_battery:
            return Decision(False, BATTERY_LOW)
        if profile.link not in self.allowed_links:
            return Decision(False, LINK_NOT_ALLOWED)
        temp = getattr(profile, "cpu_temp_c", None)
        if self.max_temp_c is not None and temp is not None and temp > self.max_temp_c:
            return Decision(False, TOO_HOT)
        mem = getattr(profile, "mem_available_mb", None)
        if mem is not None and mem < self.min_mem_mb:
            return Decision(False, LOW_MEMORY)
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
    )
