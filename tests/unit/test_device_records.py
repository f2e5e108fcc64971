"""Status from a reading, what counts as a change, and metrics records JSON can carry."""

from __future__ import annotations

import math

from edgefl.device.records import device_status, finite, profile_fields, status_key
from edgefl.profiles import Decision, Reading
from edgefl.wire import Status

OK = Decision(True, "ok")


def _status(reading: Reading, decision: Decision = OK, **kw: object) -> Status:
    args = {"uplink_kbps": 512.0, "buffered": 2, "model_version": 7, "ts": 1.0, **kw}
    return device_status("dev-1", reading, decision, **args)  # type: ignore[arg-type]


def test_status_carries_the_reading_and_the_verdict() -> None:
    status = _status(
        Reading(battery=0.4567, charging=False, link="wifi"), Decision(False, "battery_low")
    )
    assert status.id == "dev-1" and status.online and status.battery == 0.457
    assert (status.charging, status.link) == (False, "wifi")
    assert (status.uplink_kbps, status.buffered, status.model_version) == (512.0, 2, 7)
    assert (status.eligible, status.reason) == (False, "battery_low")
    assert _status(Reading(uplink_kbps=100.0)).uplink_kbps == 100.0  # the reading wins


def test_only_changes_a_selector_cares_about_count_as_changes() -> None:
    base = _status(Reading(battery=0.50))
    assert status_key(base) == status_key(_status(Reading(battery=0.502), ts=99.0, uplink_kbps=1.0))
    assert status_key(base) != status_key(_status(Reading(battery=0.49)))
    assert status_key(base) != status_key(_status(Reading(battery=0.50), buffered=3))
    assert status_key(base) != status_key(_status(Reading(battery=0.50), model_version=8))


def test_metrics_records_drop_non_finite_numbers_only() -> None:
    record = {
        "loss": math.nan,
        "train_ms": 3.0,
        "reason": "battery_low",
        "battery": None,
        "peak": math.inf,
    }
    assert finite(record) == {"train_ms": 3.0, "reason": "battery_low", "battery": None}
    fields = profile_fields(Reading(battery=None, link="ethernet"), 800.0)
    assert fields == {"battery": None, "charging": True, "link": "ethernet", "uplink_kbps": 800.0}
