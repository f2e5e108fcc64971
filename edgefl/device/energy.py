"""A device's energy account: each trained round's joules by its board's power model,
and the rounds and joules of the last hour and day that the duty cycle and the daily
budget read. Saved in the outbox file, so a restart does not reset the budget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ..config import EnergySettings
from ..outbox import DiskFull, Outbox
from ..profiles import Usage, power_model
from ..wire import MetricValue
from .records import energy_fields

log = logging.getLogger(__name__)

USAGE_KEY = "device.usage"


class EnergyAccount:
    """``received`` counts the model and delta bytes that came since the last round."""

    def __init__(self, settings: EnergySettings, clock: Callable[[], float]) -> None:
        self.power = power_model(
            settings.board,
            train_w=settings.train_w,
            up_j_per_mb=settings.up_j_per_mb,
            down_j_per_mb=settings.down_j_per_mb,
        )
        self.usage = Usage()
        self.received = 0
        self.clock = clock

    async def load(self, box: Outbox) -> None:
        self.usage = Usage.load(await asyncio.to_thread(box.get_state, USAGE_KEY))

    def now(self) -> dict[str, Any]:
        """The duty cycle's and the daily budget's counts now, as the policy takes them."""
        now = self.clock()
        return {
            "rounds_last_hour": self.usage.rounds_within(now),
            "energy_day_j": self.usage.joules_within(now),
        }

    async def spend(
        self, box: Outbox, train_ms: float, upload_bytes: int, device: str
    ) -> dict[str, MetricValue]:
        """A trained round's energy by the power model: recorded, saved, and as metrics.

        The radio counts the update's upload and what was downloaded for the round (the
        model or delta bytes received since the previous round), each once.
        """
        down, self.received = self.received, 0
        energy = self.power.round_energy(train_ms / 1000.0, upload_bytes, down)
        now = self.clock()
        self.usage.record(now, energy.total_j)
        try:
            await asyncio.to_thread(box.set_state, USAGE_KEY, self.usage.dump())
        except DiskFull as exc:
            log.warning("device %s: energy usage not saved: %s", device, exc)
        return energy_fields(energy, down, self.usage.joules_within(now))
