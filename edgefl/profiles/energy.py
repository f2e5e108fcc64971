"""Energy of a round: a per-board power model, and what a device spent in recent hours.

Pure arithmetic over recorded train time, bytes and timestamps the caller passes;
nothing here reads a meter or a clock.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Board = Literal["pi4", "pi5", "jetson-orin-nano", "phone"]
HOUR_S = 3600.0
DAY_S = 86_400.0
#: Rounds remembered for the rolling windows; beyond this many in a day the oldest go.
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class PowerModel:
    """Watts while training, joules per MB (10⁶ bytes) sent and received by the radio."""

    train_w: float
    up_j_per_mb: float
    down_j_per_mb: float

    def round_energy(self, train_s: float, bytes_up: int, bytes_down: int) -> Energy:
        """``train_w · train_s`` and ``up · MB sent + down · MB received``."""
        return Energy(
            train_j=self.train_w * max(train_s, 0.0),
            radio_j=(self.up_j_per_mb * max(bytes_up, 0) + self.down_j_per_mb * max(bytes_down, 0))
            / 1e6,
        )


@dataclass(frozen=True)
class Energy:
    """One round's energy, in joules."""

    train_j: float
    radio_j: float

    @property
    def total_j(self) -> float:
        return self.train_j + self.radio_j


# Radio: the throughput terms of Huang et al., "A Close Examination of Performance and
# Power Characteristics of 4G LTE Networks", MobiSys 2012 (Wi-Fi 283.17 mW/Mbps up,
# 137.01 down; LTE 438.39 up, 51.97 down), times 8 Mbit per MB. Training: see the README.
_WIFI = {"up_j_per_mb": 0.28317 * 8, "down_j_per_mb": 0.13701 * 8}
_LTE = {"up_j_per_mb": 0.43839 * 8, "down_j_per_mb": 0.05197 * 8}
BOARDS: dict[str, PowerModel] = {
    "pi4": PowerModel(train_w=6.4, **_WIFI),
    "pi5": PowerModel(train_w=7.9, **_WIFI),
    "jetson-orin-nano": PowerModel(train_w=15.0, **_WIFI),
    "phone": PowerModel(train_w=4.0, **_LTE),
}


def power_model(
    board: str,
    *,
    train_w: float | None = None,
    up_j_per_mb: float | None = None,
    down_j_per_mb: float | None = None,
) -> PowerModel:
    """The board's defaults with any figure given here in their place."""
    base = BOARDS[board]
    return PowerModel(
        train_w=base.train_w if train_w is None else train_w,
        up_j_per_mb=base.up_j_per_mb if up_j_per_mb is None else up_j_per_mb,
        down_j_per_mb=base.down_j_per_mb if down_j_per_mb is None else down_j_per_mb,
    )


class Usage:
    """The rounds a device trained and their joules, for the duty cycle and the daily budget.

    Rolling windows (the last hour, the last 24 hours) on the timestamps given, so a
    clock that jumps at boot costs at most one window. Kept small: entries older than a
    day are dropped, and at most ``MAX_ENTRIES``.
    """

    def __init__(self, entries: Iterable[tuple[float, float]] = ()) -> None:
        self._entries: deque[tuple[float, float]] = deque(maxlen=MAX_ENTRIES)
        for ts, joules in entries:
            if math.isfinite(ts) and math.isfinite(joules):
                self._entries.append((float(ts), max(float(joules), 0.0)))

    def record(self, ts: float, joules: float) -> None:
        self._entries.append((ts, max(joules, 0.0) if math.isfinite(joules) else 0.0))
        while self._entries and self._entries[0][0] <= ts - DAY_S:
            self._entries.popleft()

    def rounds_within(self, now: float, seconds: float = HOUR_S) -> int:
        return sum(1 for ts, _ in self._entries if now - seconds < ts <= now)

    def joules_within(self, now: float, seconds: float = DAY_S) -> float:
        return sum(j for ts, j in self._entries if now - seconds < ts <= now)

    def dump(self) -> bytes:
        return json.dumps([[ts, round(j, 6)] for ts, j in self._entries]).encode()

    @classmethod
    def load(cls, raw: bytes | None) -> Usage:
        """What ``dump`` wrote; anything else (a damaged or older file) starts afresh."""
        if not raw:
            return cls()
        try:
            rows = json.loads(raw)
            return cls((float(ts), float(j)) for ts, j in rows)
        except (ValueError, TypeError) as exc:
            log.warning("energy usage record unreadable (%s); counting from zero", exc)
            return cls()
