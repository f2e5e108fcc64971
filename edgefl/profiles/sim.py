"""Simulated battery, link and connectivity models for the fleet simulator.

Deterministic, on an injected clock; they never sleep.
"""

from __future__ import annotations

import bisect
import csv
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .reading import Link, Reading

log = logging.getLogger(__name__)

# ------------------------------------------------------------ simulated models


class SimBattery:
    """Battery level as a fraction, drained by work and filled on a charging schedule.

    Charging happens during the first ``charge_duty`` of every ``charge_period_s``
    (shifted by ``charge_offset_s``): duty 0 never charges, duty 1 always does.
    """

    def __init__(
        self,
        *,
        capacity_wh: float = 10.0,
        level: float = 1.0,
        drain_per_train_s: float = 2e-4,
        drain_per_mb: float = 5e-4,
        charge_period_s: float = 86_400.0,
        charge_duty: float = 0.0,
        charge_offset_s: float = 0.0,
        charge_rate: float = 5e-4,
        now: float = 0.0,
    ) -> None:
        if capacity_wh <= 0 or charge_period_s <= 0 or not 0 <= charge_duty <= 1:
            raise ValueError("need capacity_wh > 0, charge_period_s > 0, 0 <= charge_duty <= 1")
        self.capacity_wh, self.level = capacity_wh, min(max(level, 0.0), 1.0)
        self.drain_per_train_s, self.drain_per_mb = drain_per_train_s, drain_per_mb
        self.charge_period_s, self.charge_duty = charge_period_s, charge_duty
        self.charge_offset_s, self.charge_rate = charge_offset_s, charge_rate
        self.energy_used_wh = 0.0
        self._now = now

    def charging_at(self, t: float) -> bool:
        phase = (t - self.charge_offset_s) % self.charge_period_s
        return phase < self.charge_duty * self.charge_period_s

    @property
    def charging(self) -> bool:
        """Whether the battery is charging at the time of the last ``tick``."""
        return self.charging_at(self._now)

    def tick(self, now: float) -> None:
        """Advance to ``now``, adding the charge of every charging second since the last tick."""
        if now <= self._now:
            return
        charged = self._charge_seconds(now) - self._charge_seconds(self._now)
        self.level = min(1.0, self.level + charged * self.charge_rate)
        self._now = now

    def spend_training(self, seconds: float) -> None:
        """Drain for ``seconds`` of training at speed 1 (the work, not the wall time)."""
        self._drain(seconds * self.drain_per_train_s)

    def spend_upload(self, nbytes: int) -> None:
        self._drain(nbytes / 1e6 * self.drain_per_mb)

    def _drain(self, fraction: float) -> None:
        used = min(max(fraction, 0.0), self.level)
        self.level -= used
        self.energy_used_wh += used * self.capacity_wh

    def _charge_seconds(self, t: float) -> float:
        """Charging seconds from the schedule's origin to ``t`` (an antiderivative)."""
        on = self.charge_duty * self.charge_period_s
        periods, phase = divmod(t - self.charge_offset_s, self.charge_period_s)
        return periods * on + min(phase, on)


@dataclass(frozen=True)
class SimLink:
    """Bandwidth in kbit/s (1000 bit/s) and one-way latency; delays in simulated seconds."""

    up_kbps: float
    down_kbps: float
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.up_kbps <= 0 or self.down_kbps <= 0 or self.latency_ms < 0:
            raise ValueError(f"bad link {self}")

    def upload_delay_s(self, nbytes: int) -> float:
        return self.latency_ms / 1000 + nbytes * 8 / 1000 / self.up_kbps

    def download_delay_s(self, nbytes: int) -> float:
        return self.latency_ms / 1000 + nbytes * 8 / 1000 / self.down_kbps


class Connectivity(Protocol):
    def online(self, now: float) -> bool: ...


class MarkovConnectivity:
    """On/off Markov chain in steps of ``step_s``; each step online drops with ``p_drop``.

    The state at a step depends only on the seed and the step, not on when or how
    often it is asked: sojourns are drawn as geometric lengths, so a jump far ahead
    costs one draw per switch rather than per step. Long-run online fraction is
    ``p_recover / (p_drop + p_recover)``.
    """

    def __init__(
        self,
        p_drop: float,
        p_recover: float,
        step_s: float = 1.0,
        seed: int = 0,
        *,
        start_online: bool = True,
    ) -> None:
        if not (0 <= p_drop <= 1 and 0 <= p_recover <= 1 and step_s > 0):
            raise ValueError("need 0 <= p_drop, p_recover <= 1 and step_s > 0")
        self.p_drop, self.p_recover, self.step_s = p_drop, p_recover, step_s
        self.start_online = start_online
        self._rng = random.Random(seed)
        self._switches: list[float] = []  # steps at which the state flips
        self._horizon = 0.0

    def online(self, now: float) -> bool:
        step = max(0, math.floor(now / self.step_s))
        while self._horizon <= step:
            online = self.start_online != (len(self._switches) % 2 == 1)
            self._horizon += self._sojourn(self.p_drop if online else self.p_recover)
            self._switches.append(self._horizon)
        return self.start_online != (bisect.bisect_right(self._switches, step) % 2 == 1)

    def _sojourn(self, p: float) -> float:
        if p <= 0:
            return math.inf
        u = 1.0 - self._rng.random()  # (0, 1]
        return 1.0 if p >= 1 else math.floor(math.log(u) / math.log1p(-p)) + 1.0


class TraceConnectivity:
    """Offline windows ``[start_s, end_s)`` from a measured trace; online elsewhere."""

    def __init__(self, intervals: Iterable[tuple[float, float]]) -> None:
        merged: list[list[float]] = []
        for start, end in sorted((float(a), float(b)) for a, b in intervals):
            if end <= start:
                raise ValueError(f"offline window ends before it starts: {start}, {end}")
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [w[0] for w in merged]
        self._ends = [w[1] for w in merged]

    @classmethod
    def from_csv(cls, path: str | Path) -> TraceConnectivity:
        """Rows ``start_s,end_s``; a header row, blank lines and ``#`` comments are skipped."""
        rows = []
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if not row or row[0].lstrip().startswith("#"):
                    continue
                try:
                    rows.append((float(row[0]), float(row[1])))
                except (ValueError, IndexError):
                    if rows:  # only the first row may be a header
                        raise ValueError(f"{path}: bad row {row}") from None
        return cls(rows)

    def online(self, now: float) -> bool:
        i = bisect.bisect_right(self._starts, now) - 1
        return i < 0 or now >= self._ends[i]


@dataclass
class SimProfile:
    """One simulated device's resources, usually drawn from a ProfileSpec."""

    battery: SimBattery | None  # None: mains-powered
    link: SimLink
    link_type: Link = "wifi"
    connectivity: Connectivity | None = None  # None: always online
    speed: float = 1.0  # compute speed factor: training takes (time at speed 1) / speed
    cpu_temp_c: float | None = None
    mem_available_mb: float | None = None
    cuda: bool = False


class SimReader:
    """A simulated device's Reading at the injected clock's time, for the same policy."""

    def __init__(self, profile: SimProfile, clock: Callable[[], float]) -> None:
        self.profile, self._clock = profile, clock

    def online(self) -> bool:
        c = self.profile.connectivity
        return c is None or c.online(self._clock())

    def read(self) -> Reading:
        p = self.profile
        if p.battery is not None:
            p.battery.tick(self._clock())
        return Reading(
            battery=None if p.battery is None else p.battery.level,
            charging=True if p.battery is None else p.battery.charging,
            link=p.link_type,
            uplink_kbps=p.link.up_kbps,
            cpu_temp_c=p.cpu_temp_c,
            mem_available_mb=p.mem_available_mb,
            cuda=p.cuda,
        )
