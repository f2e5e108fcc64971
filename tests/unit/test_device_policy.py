"""Whether a device takes a round: selection, deadline, eligibility, uplink floor."""

from __future__ import annotations

import pytest

from edgefl.config import PolicySettings
from edgefl.device import DEADLINE_PASSED, decide, policy_of, selected
from edgefl.profiles import Reading
from edgefl.wire import Announcement


def _verdict(reading: Reading, settings: PolicySettings | None = None, **kw: float) -> str:
    settings = settings or PolicySettings()
    return decide(policy_of(settings), settings, reading, expected_bytes=20_000, **kw).reason


@pytest.mark.parametrize(
    ("reading", "reason"),
    [
        (Reading(battery=0.1, charging=False), "battery_low"),
        (Reading(battery=0.1, charging=True), "ok"),
        (Reading(battery=None, charging=True), "ok"),  # mains power
        (Reading(battery=0.9, charging=False, cpu_temp_c=95.0), "too_hot"),
    ],
)
def test_policy_settings_decide_like_the_shared_policy(reading: Reading, reason: str) -> None:
    assert _verdict(reading) == reason


def test_a_link_left_out_of_allowed_links_declines() -> None:
    settings = PolicySettings(allowed_links=["ethernet", "wifi"])
    assert _verdict(Reading(link="cellular"), settings) == "link_not_allowed"
    assert _verdict(Reading(link="wifi"), settings) == "ok"


def test_uplink_too_slow_for_the_deadline_or_below_the_floor_declines() -> None:
    # 20 kB at 8 kbit/s takes 20 s: 30 s left is enough, 10 s is not.
    slow = Reading(uplink_kbps=8.0)
    assert _verdict(slow, deadline=1030.0, now=1000.0) == "ok"
    assert _verdict(slow, deadline=1010.0, now=1000.0) == "uplink_too_slow"
    assert _verdict(slow, PolicySettings(min_uplink_kbps=10.0)) == "uplink_too_slow"


def test_a_passed_deadline_declines_before_anything_else() -> None:
    assert _verdict(Reading(), deadline=999.0, now=1000.0) == DEADLINE_PASSED
    assert _verdict(Reading(), deadline=0.0, now=1000.0) == "ok"  # no deadline


def test_an_empty_selection_asks_everyone() -> None:
    announcement = Announcement(sender="gw-1", version=0, round=0)
    assert selected(announcement, "dev-1")
    announcement.selected = ["dev-2"]
    assert not selected(announcement, "dev-1") and selected(announcement, "dev-2")
