"""Every scenario shipped in simulators/ loads, validates and describes a fleet that can run."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.simulator.scenario_file import load_scenario

SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "simulators").glob("*.toml"))


def test_the_shipped_scenarios_include_the_documented_ones() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {"default", "flaky", "low-battery", "adversarial", "large"} <= names


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_loads_and_draws_its_fleet(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.description
    plans = scenario.devices()
    assert len(plans) == sum(scenario.devices_per_gateway()) >= scenario.fleet.gateways
    assert {p.gateway for p in plans} == set(scenario.gateway_ids())
    assert sorted(p.shard for p in plans) == list(range(len(plans)))
    for plan in plans[:50]:
        profile = scenario.profile(plan)
        assert profile.link.up_kbps > 0 and profile.speed > 0
    nodes = scenario.gateway_settings(0, [plans[0].id], broker="127.0.0.1:1", state_dir=Path("s"))
    assert nodes.parent == "cloud" and nodes.role == "gateway"


def test_default_scenario_is_the_documented_fleet() -> None:
    scenario = load_scenario(None)
    assert scenario.name == "default"
    assert scenario.fleet.gateways == 4
    assert len(scenario.devices()) == 40


def test_large_scenario_has_a_thousand_devices() -> None:
    assert len(load_scenario("large").devices()) == 1000


def test_adversarial_scenario_has_five_percent_attackers() -> None:
    scenario = load_scenario("adversarial")
    attackers = [p for p in scenario.devices() if scenario.profiles[p.cohort].attack != "none"]
    assert len(attackers) == round(0.05 * len(scenario.devices()))


def test_flaky_scenario_drops_a_third_of_its_devices() -> None:
    scenario = load_scenario("flaky")
    plans = scenario.devices()
    flaky = [p for p in plans if scenario.profiles[p.cohort].p_drop.at(0.5) > 0]
    assert len(flaky) == round(len(plans) / 3)


def test_the_packaged_default_is_the_repository_default() -> None:
    from edgefl.simulator.scenario_file import PACKAGED_DEFAULT

    repo = Path(__file__).resolve().parents[2] / "simulators" / "default.toml"
    assert PACKAGED_DEFAULT.read_bytes() == repo.read_bytes()
    assert load_scenario(PACKAGED_DEFAULT).fleet == load_scenario(None).fleet
