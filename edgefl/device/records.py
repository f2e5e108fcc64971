"""What a device tells its gateway and its monitors: Status and metrics records. Pure.

A Status goes out at once when something a selector cares about changes
(``status_key``), otherwise only on the heartbeat.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..profiles import Decision, Energy, Reading
from ..wire import MetricValue, Status


def device_status(
    device_id: str,
    reading: Reading,
    decision: Decision,
    *,
    uplink_kbps: float | None,
    buffered: int,
    model_version: int | None,
    ts: float,
    samples: int | None = None,
    declined: tuple[int, str] | None = None,
) -> Status:
    """``uplink_kbps`` is used where the reading has no figure of its own; ``samples``
    (the local data set's size) is the weight bound the device declares to its node."""
    kbps = reading.uplink_kbps if reading.uplink_kbps is not None else uplink_kbps
    return Status(
        online=True,
        id=device_id,
        battery=None if reading.battery is None else round(reading.battery, 3),
        charging=reading.charging,
        link=reading.link,
        uplink_kbps=None if kbps is None else round(kbps, 1),
        buffered=buffered,
        model_version=model_version,
        samples=samples,
        eligible=decision.ok,
        reason=declined[1] if declined else "" if decision.ok else decision.reason,
        declined=declined[0] if declined else None,
        ts=ts,
    )


def status_key(status: Status) -> tuple[Any, ...]:
    """What counts as a change worth publishing at once: not ``ts``, not the uplink estimate."""
    battery = None if status.battery is None else round(status.battery * 100)
    return (
        status.online,
        battery,
        status.charging,
        status.link,
        status.buffered,
        status.model_version,
        status.eligible,
        status.reason,
        status.declined,
    )


def profile_fields(reading: Reading, uplink_kbps: float | None) -> dict[str, MetricValue]:
    """The device's resources as they go into every metrics record."""
    return {
        "battery": reading.battery,
        "charging": reading.charging,
        "link": reading.link,
        "uplink_kbps": reading.uplink_kbps if reading.uplink_kbps is not None else uplink_kbps,
    }


def energy_fields(energy: Energy, download_bytes: int, day_j: float) -> dict[str, MetricValue]:
    """A trained round's energy by the power model, and the last 24 hours' total."""
    return {
        "energy_j": round(energy.total_j, 6),
        "energy_train_j": round(energy.train_j, 6),
        "energy_radio_j": round(energy.radio_j, 6),
        "download_bytes": download_bytes,
        "energy_day_j": round(day_j, 6),
    }


def finite(record: Mapping[str, MetricValue]) -> dict[str, MetricValue]:
    """The record without NaN or infinities, which JSON cannot carry."""
    return {k: v for k, v in record.items() if not isinstance(v, float) or math.isfinite(v)}
