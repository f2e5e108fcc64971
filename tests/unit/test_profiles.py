from __future__ import annotations

import itertools
import math
import sys
import types
from collections import namedtuple
from pathlib import Path

import numpy as np
import psutil
import pytest
from pydantic import ValidationError

from edgefl import profiles
from edgefl.profiles import (
    LINKS,
    REASONS,
    Decision,
    Dist,
    EligibilityPolicy,
    MarkovConnectivity,
    OsReader,
    ProfileSpec,
    Reading,
    SimBattery,
    SimLink,
    SimProfile,
    SimReader,
    TraceConnectivity,
    UplinkEstimator,
    default_route_interface,
    draw_profile,
    link_of,
    read_battery,
    read_cpu_temp,
    read_link,
    read_memory_mb,
)
from edgefl.wire import Status

Battery = namedtuple("Battery", "percent secsleft power_plugged")
Temp = namedtuple("Temp", "label current high critical")
IfStats = namedtuple("IfStats", "isup duplex speed mtu")

ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wwan0\t00000000\t0101A8C0\t0003\t0\t0\t700\t00000000\t0\t0\t0
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0101A8C0\t0002\t0\t0\t100\t00000000\t0\t0\t0
"""


# ------------------------------------------------------------------ OS readers


def test_mains_powered_board_has_no_battery_and_counts_as_charging() -> None:
    reader = OsReader(
        battery=lambda: None,
        link=lambda: "ethernet",
        cpu_temp=lambda: 47.5,
        memory=lambda: 512.0,
        cuda=lambda: True,
    )
    assert reader.read() == Reading(
        battery=None,
        charging=True,
        link="ethernet",
        uplink_kbps=None,
        cpu_temp_c=47.5,
        mem_available_mb=512.0,
        cuda=True,
    )


def test_injected_battery_reader_is_used() -> None:
    reading = OsReader(battery=lambda: (0.1, False), cuda=lambda: False).read()
    assert (reading.battery, reading.charging) == (0.1, False)


def test_psutil_battery_percent_becomes_a_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: Battery(42.0, 3600, False))
    assert read_battery() == (0.42, False)
    monkeypatch.setattr(psutil, "sensors_battery", lambda: Battery(100.0, -2, None))
    assert read_battery() == (1.0, False)  # unknown plug state: do not assume charging
    monkeypatch.setattr(psutil, "sensors_battery", lambda: None)
    assert read_battery() is None
    monkeypatch.delattr(psutil, "sensors_battery")
    assert read_battery() is None


@pytest.mark.parametrize(
    ("name", "link"),
    [
        ("eth0", "ethernet"),
        ("enp3s0", "ethernet"),
        ("enx00e04c680001", "ethernet"),
        ("wlan0", "wifi"),
        ("wlp2s0", "wifi"),
        ("wwan0", "cellular"),
        ("rmnet_data0", "cellular"),
        ("ppp0", "cellular"),
        ("usb0", "cellular"),
        ("docker0", "unknown"),
        ("lo", "unknown"),
    ],
)
def test_interface_names_map_to_link_types(name: str, link: str) -> None:
    assert link_of(name) == link


def test_default_route_with_lowest_metric_wins(tmp_path: Path) -> None:
    routes = tmp_path / "route"
    routes.write_text(ROUTES)  # eth0's default route is down (flags 0002)
    assert default_route_interface(routes) == "wlan0"
    assert read_link(routes) == "wifi"
    assert default_route_interface(tmp_path / "missing") is None


def test_without_a_route_table_the_best_up_interface_with_an_address_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = {
        "lo": IfStats(True, 0, 0, 65536),
        "docker0": IfStats(True, 0, 0, 1500),
        "eth0": IfStats(False, 0, 0, 1500),
        "wwan0": IfStats(True, 0, 0, 1500),
        "wlan0": IfStats(True, 0, 0, 1500),
        "enp1s0": IfStats(True, 0, 0, 1500),
    }
    addrs = {"lo": ["127.0.0.1"], "docker0": ["a"], "eth0": ["b"], "wwan0": ["c"], "wlan0": ["d"]}
    monkeypatch.setattr(psutil, "net_if_stats", lambda: stats)
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: addrs)
    assert read_link(tmp_path / "missing") == "wifi"  # eth0 down, enp1s0 has no address
    del addrs["wlan0"]
    assert read_link(tmp_path / "missing") == "cellular"
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {"lo": ["127.0.0.1"]})
    assert read_link(tmp_path / "missing") == "unknown"


def test_cpu_temperature_is_the_hottest_finite_sensor(monkeypatch: pytest.MonkeyPatch) -> None:
    sensors = {
        "cpu_thermal": [Temp("", 51.5, None, None)],
        "gpu": [Temp("", 62.0, 90.0, 100.0), Temp("", math.nan, None, None)],
        "odd": [Temp("", None, None, None)],
    }
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: sensors, raising=False)
    assert read_cpu_temp() == 62.0
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {}, raising=False)
    assert read_cpu_temp() is None
    monkeypatch.delattr(psutil, "sensors_temperatures")  # macOS, Windows
    assert read_cpu_temp() is None


def test_available_memory_is_reported_in_mib() -> None:
    expected = psutil.virtual_memory().available / 2**20
    assert read_memory_mb() == pytest.approx(expected, rel=0.2)
    assert read_memory_mb() > 1


def test_cuda_probe_imports_torch_once_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def is_available() -> bool:
        calls.append(1)
        return True

    fake = types.ModuleType("torch")
    fake.cuda = types.SimpleNamespace(is_available=is_available)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake)
    profiles.cuda_available.cache_clear()
    try:
        assert profiles.cuda_available() is True
        assert profiles.cuda_available() is True
        assert len(calls) == 1
        monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
        profiles.cuda_available.cache_clear()
        assert profiles.cuda_available() is False
    finally:
        profiles.cuda_available.cache_clear()


def test_real_os_reader_gives_a_valid_reading() -> None:
    reading = OsReader(cuda=lambda: False).read()
    assert reading.link in LINKS
    assert reading.battery is None or 0 <= reading.battery <= 1
    assert reading.mem_available_mb is not None and reading.mem_available_mb > 0


def test_uplink_estimate_is_an_ewma_that_ignores_tiny_samples() -> None:
    est = UplinkEstimator(alpha=0.5)
    assert est.kbps is None
    est.record(125_000, 1.0)  # 1,000,000 bit in 1 s
    assert est.kbps == pytest.approx(1000.0)
    est.record(500_000, 2.0)  # 2000 kbit/s
    assert est.kbps == pytest.approx(1500.0)
    est.record(100, 0.5)  # too small to time
    est.record(1_000_000, 0.0)
    est.record(1_000_000, math.nan)
    assert est.kbps == pytest.approx(1500.0)
    assert est.samples == 2
    reader = OsReader(battery=lambda: None, cuda=lambda: False, uplink=est)
    assert reader.read().uplink_kbps == pytest.approx(1500.0)


# ------------------------------------------------------------------ eligibility


def _reading(**kw: object) -> Reading:
    base: dict[str, object] = {"battery": 0.8, "charging": False, "link": "wifi"}
    return Reading(**{**base, **kw})  # type: ignore[arg-type]


def test_reasons_are_the_documented_stable_strings() -> None:
    assert REASONS == (
        "ok",
        "battery_low",
        "not_charging",
        "link_not_allowed",
        "too_hot",
        "low_memory",
        "duty_cycle",
        "energy_budget",
        "uplink_too_slow",
    )


def test_healthy_reading_is_eligible() -> None:
    decision = EligibilityPolicy().decide(_reading(uplink_kbps=1000, cpu_temp_c=60))
    assert decision == Decision(True, "ok")
    assert decision


@pytest.mark.parametrize(
    ("battery", "charging", "reason"),
    [
        (0.29, False, "battery_low"),
        (0.30, False, "ok"),
        (0.05, True, "ok"),
        (None, False, "ok"),
    ],
)
def test_battery_threshold_is_ignored_when_charging(
    battery: float | None, charging: bool, reason: str
) -> None:
    assert EligibilityPolicy().decide(_reading(battery=battery, charging=charging)).reason == reason


def test_each_check_names_its_reason() -> None:
    policy = EligibilityPolicy(allowed_links=("ethernet", "wifi"), min_mem_mb=256)
    assert policy.decide(_reading(link="cellular")) == Decision(False, "link_not_allowed")
    assert policy.decide(_reading(cpu_temp_c=80.5)) == Decision(False, "too_hot")
    assert policy.decide(_reading(cpu_temp_c=80.0)).ok
    assert policy.decide(_reading(mem_available_mb=100)) == Decision(False, "low_memory")
    assert policy.decide(_reading(mem_available_mb=300)).ok
    assert EligibilityPolicy(max_temp_c=None).decide(_reading(cpu_temp_c=120)).ok
    assert not policy.decide(_reading(battery=0.1, link="cellular", cpu_temp_c=99))
    assert policy.decide(_reading(battery=0.1, link="cellular")).reason == "battery_low"


def test_uplink_too_slow_when_the_update_cannot_arrive_by_the_deadline() -> None:
    policy = EligibilityPolicy()
    slow = _reading(uplink_kbps=100.0)  # 1 MB takes 80 s
    assert policy.decide(slow, expected_bytes=1_000_000, deadline_s=30).reason == "uplink_too_slow"
    assert policy.decide(slow, expected_bytes=1_000_000, deadline_s=81).ok
    assert policy.decide(slow, expected_bytes=1_000_000).ok  # no deadline
    assert policy.decide(_reading(uplink_kbps=None), expected_bytes=10**9, deadline_s=1).ok
    assert not policy.decide(_reading(uplink_kbps=0.0), expected_bytes=1, deadline_s=1000)


def test_the_aggregator_can_apply_the_policy_to_a_child_status() -> None:
    policy = EligibilityPolicy(allowed_links=("ethernet", "wifi"))
    low = Status(online=True, battery=0.1, charging=False, link="wifi")
    cell = Status(online=True, battery=0.9, charging=False, link="cellular")
    plugged = Status(online=True, battery=0.1, charging=True, link="ethernet", uplink_kbps=50)
    assert policy.decide(low).reason == "battery_low"
    assert policy.decide(cell).reason == "link_not_allowed"
    assert policy.decide(plugged).ok
    assert policy.decide(plugged, expected_bytes=100_000, deadline_s=10).reason == (
        "uplink_too_slow"
    )


def test_policy_settings_are_validated() -> None:
    assert EligibilityPolicy.model_validate({"allowed_links": ["wifi"]}).allowed_links == ("wifi",)
    with pytest.raises(ValidationError):
        EligibilityPolicy(min_battery=1.5)
    with pytest.raises(ValidationError):
        EligibilityPolicy.model_validate({"allowed_links": ["satellite"]})
    with pytest.raises(ValidationError):
        EligibilityPolicy.model_validate({"min_batery": 0.2})


# ------------------------------------------------------------ simulated models


def test_battery_drains_by_training_and_upload_and_counts_energy() -> None:
    b = SimBattery(capacity_wh=10, level=0.5, drain_per_train_s=2e-4, drain_per_mb=1e-3)
    b.spend_training(100)
    assert b.level == pytest.approx(0.48)
    b.spend_upload(5_000_000)
    assert b.level == pytest.approx(0.475)
    assert b.energy_used_wh == pytest.approx(0.25)
    b.spend_training(10_000)  # wants 2.0, only 0.475 left
    assert b.level == 0.0
    assert b.energy_used_wh == pytest.approx(5.0)
    assert not b.charging


def test_battery_charges_only_in_the_duty_part_of_each_period() -> None:
    b = SimBattery(level=0.5, charge_period_s=100, charge_duty=0.25, charge_rate=0.01)
    b.tick(10)  # 10 s charging
    assert b.level == pytest.approx(0.6) and b.charging
    b.tick(60)  # 15 more (10..25), then discharging
    assert b.level == pytest.approx(0.75) and not b.charging
    b.spend_training(0)
    b.tick(50)  # the clock never runs backwards
    assert b.level == pytest.approx(0.75)
    b.tick(320)  # 25 s in each of 100..125, 200..225, 300..320: capped at full
    assert b.level == 1.0 and b.charging
    assert b.energy_used_wh == 0.0


def test_charge_schedule_always_never_and_offset() -> None:
    always = SimBattery(level=0.0, charge_duty=1.0, charge_rate=0.001)
    always.tick(500)
    assert always.level == pytest.approx(0.5) and always.charging
    never = SimBattery(level=0.2, charge_duty=0.0, charge_rate=1.0)
    never.tick(10_000)
    assert never.level == 0.2 and not never.charging
    shifted = SimBattery(charge_period_s=100, charge_duty=0.25, charge_offset_s=50)
    assert [shifted.charging_at(t) for t in (0, 49.9, 50, 74.9, 75, 150)] == [
        False,
        False,
        True,
        True,
        False,
        True,
    ]


def test_link_delays_are_latency_plus_size_over_bandwidth() -> None:
    link = SimLink(up_kbps=1000, down_kbps=10_000, latency_ms=20)
    assert link.upload_delay_s(125_000) == pytest.approx(1.02)
    assert link.download_delay_s(125_000) == pytest.approx(0.12)
    with pytest.raises(ValueError):
        SimLink(up_kbps=0, down_kbps=1)


def test_markov_connectivity_is_deterministic_whatever_the_query_times() -> None:
    a = MarkovConnectivity(0.2, 0.4, step_s=10, seed=7)
    b = MarkovConnectivity(0.2, 0.4, step_s=10, seed=7)
    seq = [a.online(t) for t in np.arange(0, 20_000, 10.0)]
    assert b.online(19_990.0) == seq[-1]  # jumped straight to the end
    assert [b.online(t + 3.0) for t in np.arange(0, 20_000, 10.0)] == seq  # mid-step, replayed
    other = MarkovConnectivity(0.2, 0.4, step_s=10, seed=8)
    assert [other.online(t) for t in np.arange(0, 20_000, 10.0)] != seq
    assert seq[0] is True  # starts online


def test_markov_connectivity_matches_its_stationary_share_and_sojourns() -> None:
    c = MarkovConnectivity(p_drop=0.1, p_recover=0.3, step_s=1.0, seed=3)
    states = [c.online(float(t)) for t in range(100_000)]
    assert sum(states) / len(states) == pytest.approx(0.3 / (0.1 + 0.3), abs=0.02)
    runs, length = [], 1
    for prev, cur in itertools.pairwise(states):
        if cur == prev:
            length += 1
        else:
            if prev:
                runs.append(length)
            length = 1
    assert float(np.mean(runs)) == pytest.approx(1 / 0.1, rel=0.1)  # mean online sojourn


def test_markov_edge_probabilities() -> None:
    never_drops = MarkovConnectivity(0.0, 0.5, seed=1)
    assert all(never_drops.online(float(t)) for t in range(0, 10_000, 7))
    flips = MarkovConnectivity(1.0, 1.0, step_s=2.0, seed=1)
    assert [flips.online(t) for t in (0, 1.9, 2, 4, 6.5)] == [True, True, False, True, False]
    with pytest.raises(ValueError):
        MarkovConnectivity(1.5, 0.1)


def test_trace_connectivity_merges_windows_and_loads_csv(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("start_s,end_s\n# nightly outage\n10,20\n\n15,30\n50,60\n")
    c = TraceConnectivity.from_csv(trace)
    checks = {0: True, 9.99: True, 10: False, 25: False, 29.9: False, 30: True, 55: False, 60: True}
    assert {t: c.online(t) for t in checks} == checks
    trace.write_text("10,20\nbad,row\n")
    with pytest.raises(ValueError, match="bad row"):
        TraceConnectivity.from_csv(trace)
    with pytest.raises(ValueError):
        TraceConnectivity([(5, 5)])


def test_sim_reader_follows_the_clock_and_feeds_the_same_policy() -> None:
    now = [200.0]  # outside the charging window (0..100 of every 1000 s)
    battery = SimBattery(
        level=0.4,
        drain_per_train_s=1e-3,
        charge_period_s=1000,
        charge_duty=0.1,
        charge_rate=1e-3,
        now=200,
    )
    profile = SimProfile(
        battery=battery,
        link=SimLink(500, 5000, 10),
        link_type="cellular",
        connectivity=TraceConnectivity([(300, 400)]),
    )
    reader = SimReader(profile, lambda: now[0])
    policy = EligibilityPolicy()
    first = reader.read()
    assert (first.battery, first.charging, first.link, first.uplink_kbps) == (
        pytest.approx(0.4),
        False,
        "cellular",
        500,
    )
    battery.spend_training(150)  # 0.4 -> 0.25
    assert policy.decide(reader.read()).reason == "battery_low"
    assert reader.online()
    now[0] = 350
    assert not reader.online()
    now[0] = 1050  # 50 s into the next charging window: +0.05, and charging
    reading = reader.read()
    assert reading.battery == pytest.approx(0.30) and reading.charging
    assert policy.decide(reading).ok


def test_mains_powered_sim_device_reads_like_a_plugged_board() -> None:
    reader = SimReader(SimProfile(battery=None, link=SimLink(1, 1)), lambda: 0.0)
    reading = reader.read()
    assert (reading.battery, reading.charging) == (None, True)
    assert reader.online()


# --------------------------------------------------------------- scenario specs

SPEC = {
    "battery_level": {"dist": "uniform", "low": 0.2, "high": 1.0},
    "uplink_kbps": {"dist": "lognormal", "mean": 1000.0, "sigma": 0.5},
    "latency_ms": {"dist": "normal", "mean": 50.0, "sigma": 40.0, "low": 5.0},
    "link": {"wifi": 0.7, "cellular": 0.3},
    "mains_powered": 0.25,
    "p_drop": 0.05,
    "cpu_temp_c": 55,
}


def _summary(p: SimProfile) -> tuple[object, ...]:
    level = None if p.battery is None else p.battery.level
    return (level, p.link, p.link_type, p.speed, p.cpu_temp_c)


def test_same_seed_same_profile_and_seeds_differ() -> None:
    spec = ProfileSpec.model_validate(SPEC)
    assert _summary(draw_profile(spec, 11)) == _summary(draw_profile(spec, 11))
    assert _summary(draw_profile(spec, 11)) != _summary(draw_profile(spec, 12))
    c1, c2 = draw_profile(spec, 11).connectivity, draw_profile(spec, 11).connectivity
    assert c1 is not None and c2 is not None
    assert [c1.online(t) for t in range(0, 50_000, 10)] == [
        c2.online(t) for t in range(0, 50_000, 10)
    ]
    gen_a, gen_b = np.random.default_rng(5), np.random.default_rng(5)
    assert _summary(draw_profile(spec, gen_a)) == _summary(draw_profile(spec, gen_b))


def test_draws_follow_their_distributions() -> None:
    spec = ProfileSpec.model_validate(SPEC)
    fleet = [draw_profile(spec, seed) for seed in range(4000)]
    levels = [p.battery.level for p in fleet if p.battery is not None]
    assert min(levels) >= 0.2 and max(levels) <= 1.0
    assert float(np.mean(levels)) == pytest.approx(0.6, abs=0.02)
    assert len(levels) / len(fleet) == pytest.approx(0.75, abs=0.03)
    assert float(np.mean([p.link.up_kbps for p in fleet])) == pytest.approx(1000, rel=0.05)
    assert min(p.link.latency_ms for p in fleet) == 5.0  # clipped at low
    share_wifi = sum(p.link_type == "wifi" for p in fleet) / len(fleet)
    assert share_wifi == pytest.approx(0.7, abs=0.03)
    assert {p.cpu_temp_c for p in fleet} == {55.0}
    assert all(p.link.down_kbps == 10_000 for p in fleet)  # default constant


def test_changing_one_field_leaves_the_other_draws_alone() -> None:
    a = ProfileSpec.model_validate(SPEC)
    b = ProfileSpec.model_validate({**SPEC, "speed": {"dist": "uniform", "low": 0.5, "high": 2}})
    pa, pb = draw_profile(a, 99), draw_profile(b, 99)
    assert pa.link == pb.link and pa.link_type == pb.link_type
    assert pa.speed == 1.0 and 0.5 <= pb.speed <= 2


def test_spec_validation_catches_mistakes() -> None:
    assert ProfileSpec.model_validate({"uplink_kbps": 250}).uplink_kbps == Dist(value=250)
    for bad in (
        {"battery_level": {"dist": "uniform", "low": 0.2}},
        {"battery_level": {"dist": "uniform", "low": 0.9, "high": 0.2}},
        {"uplink_kbps": {"dist": "lognormal", "mean": 0, "sigma": 1}},
        {"uplink_kbps": {"dist": "gamma", "mean": 1}},
        {"link": {"wifi": -1.0}},
        {"link": "satellite"},
        {"batery_level": 0.5},
    ):
        with pytest.raises(ValidationError):
            ProfileSpec.model_validate(bad)


def test_trace_in_the_spec_replaces_the_markov_chain(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("0,100\n")
    profile = draw_profile(ProfileSpec(trace=trace), 1)
    assert isinstance(profile.connectivity, TraceConnectivity)
    assert not profile.connectivity.online(50) and profile.connectivity.online(100)
