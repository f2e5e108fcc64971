"""The power model, the rolling usage windows and the energy-aware eligibility checks."""

from __future__ import annotations

import pytest

from edgefl.config import DeviceSettings, PolicySettings
from edgefl.profiles import (
    BOARDS,
    DUTY_CYCLE,
    ENERGY_BUDGET,
    NOT_CHARGING,
    OK,
    EligibilityPolicy,
    PowerModel,
    Reading,
    Usage,
    policy_of,
    power_model,
)
from edgefl.profiles.energy import DAY_S, HOUR_S
from edgefl.simulator.history import History, summarize
from edgefl.simulator.report import summary_lines


def test_round_energy_is_watts_times_seconds_plus_joules_per_mb() -> None:
    model = PowerModel(train_w=6.4, up_j_per_mb=2.0, down_j_per_mb=0.5)
    energy = model.round_energy(train_s=2.5, bytes_up=300_000, bytes_down=1_200_000)
    assert energy.train_j == pytest.approx(16.0)
    assert energy.radio_j == pytest.approx(0.6 + 0.6)
    assert energy.total_j == pytest.approx(17.2)


def test_every_board_has_positive_figures_and_overrides_replace_them() -> None:
    assert set(BOARDS) == {"pi4", "pi5", "jetson-orin-nano", "phone"}
    assert all(m.train_w > 0 and m.up_j_per_mb > 0 and m.down_j_per_mb > 0 for m in BOARDS.values())
    mine = power_model("pi5", train_w=3.0)
    assert (mine.train_w, mine.up_j_per_mb) == (3.0, BOARDS["pi5"].up_j_per_mb)
    assert DeviceSettings(id="d").energy.board == "pi4"


def test_usage_counts_rounds_in_the_last_hour_and_joules_in_the_last_day() -> None:
    usage = Usage()
    for ts in (0.0, 1000.0, 3000.0, 3500.0):
        usage.record(ts, 10.0)
    assert usage.rounds_within(3600.0) == 3  # the one at 0 is an hour old
    assert usage.joules_within(3600.0) == pytest.approx(40.0)
    assert usage.joules_within(DAY_S + 2000.0) == pytest.approx(20.0)
    restored = Usage.load(usage.dump())
    assert restored.rounds_within(3600.0, HOUR_S) == 3
    assert Usage.load(b"not json").rounds_within(3600.0) == 0


def _on_battery(level: float) -> Reading:
    return Reading(battery=level, charging=False, link="wifi")


def test_preferring_charging_declines_on_a_battery_not_charged_enough() -> None:
    policy = EligibilityPolicy(prefer_charging=True, charged_battery=0.9)
    assert policy.decide(_on_battery(0.8)).reason == NOT_CHARGING
    assert policy.decide(_on_battery(0.95)).reason == OK
    assert policy.decide(Reading(battery=0.5, charging=True, link="wifi")).reason == OK
    assert EligibilityPolicy().decide(_on_battery(0.8)).reason == OK


def test_the_duty_cycle_and_the_daily_budget_decline_at_their_caps() -> None:
    policy = policy_of(PolicySettings(max_rounds_per_hour=4, daily_energy_j=100.0))
    reading = _on_battery(0.8)
    assert policy.decide(reading, rounds_last_hour=3, energy_day_j=99.0).reason == OK
    assert policy.decide(reading, rounds_last_hour=4, energy_day_j=0.0).reason == DUTY_CYCLE
    assert policy.decide(reading, rounds_last_hour=0, energy_day_j=100.0).reason == ENERGY_BUDGET
    # A node judging a child's Status knows neither count: nothing to decline on.
    assert policy.decide(reading).reason == OK


def test_the_simulator_sums_the_devices_energy_per_cloud_round_and_in_the_summary() -> None:
    history = History(devices=2, gateways=1)
    for joules in (1.5, 2.25):
        history.feed({"role": "device", "id": "d", "event": "round", "energy_j": joules})
    history.feed({"role": "device", "id": "d", "event": "declined", "reason": "duty_cycle"})
    first = history.feed({"role": "cloud", "id": "cloud", "event": "round", "version": 1})
    history.feed({"role": "device", "id": "d", "event": "round", "energy_j": 4.0})
    second = history.feed({"role": "cloud", "id": "cloud", "event": "round", "version": 2})
    assert first is not None and second is not None
    assert (first["energy_j"], second["energy_j"]) == (3.75, 4.0)
    summary = summarize(history.rows, [], float32_update_bytes=1)
    assert summary["energy_model_j"] == pytest.approx(7.75)
    assert ("energy (model)", "7.8 J over the devices' rounds (their power model)") in (
        summary_lines(summary)
    )
