"""Scenario schema: validation, overrides, seeded fleets and settings isolation."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.cli import main as cli_main
from edgefl.config import ConfigError
from edgefl.simulator import overrides_from_args
from edgefl.simulator.scenario import Scenario, assign_cohorts, derive_seed
from edgefl.simulator.scenario_file import load_scenario
from edgefl.tasks import load_task


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_an_empty_file_is_a_valid_small_fleet(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, ""))
    assert scenario.name == "s"
    assert len(scenario.devices()) == 40
    assert scenario.profiles[0].share == 1.0


def test_overrides_take_dotted_keys_and_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "rounds = 3\n[fleet]\ndevices_per_gateway = 5\n")
    scenario = load_scenario(path, **{"rounds": "7", "fleet.devices_per_gateway": "2"})
    assert scenario.rounds == 7
    assert scenario.devices_per_gateway() == [2, 2, 2, 2]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("rounds = 0", "rounds"),
        ("bogus = 1", "bogus: unknown setting"),
        ("[gateway]\nsync_every = 0", "[gateway] sync_every"),
        ("[gateway]\nparent = 'x'", "parent: set by the simulator"),
        ("[device]\nmqtt = { broker = 'h:1' }", "mqtt.broker: set by the simulator"),
        ("[[profiles]]\nshare = -1", "share"),
        ("[[profiles]]\nname = 'a'\n[[profiles]]\nname = 'a'", "profile names must differ"),
        ("[task]\npartition = 'zipf'", "partition"),
        ("rounds = ", "s.toml"),
    ],
)
def test_a_bad_scenario_is_one_readable_line(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_scenario(write(tmp_path, text))
    message = str(err.value)
    assert words in message
    assert "\n" not in message
    assert "Value error," not in message


def test_a_missing_scenario_says_where_it_looked() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_scenario("no-such-scenario")


def test_a_name_is_looked_up_under_simulators() -> None:
    assert load_scenario("flaky").name == "flaky"


def test_cohorts_get_exact_shares_whatever_the_seed() -> None:
    for seed in range(5):
        labels = assign_cohorts([0.95, 0.025, 0.025], 40, seed)
        assert sorted(labels) == [0] * 38 + [1] + [2]
    assert assign_cohorts([2, 1], 3, 0).count(0) == 2
    assert assign_cohorts([1, 1], 40, 1) != assign_cohorts([1, 1], 40, 2)


def test_derived_seeds_are_stable_and_independent() -> None:
    assert derive_seed(0, "profile", 3) == derive_seed(0, "profile", 3)
    seeds = {derive_seed(0, "profile", i) for i in range(100)}
    assert len(seeds) == 100
    assert derive_seed(0, "profile", 0) != derive_seed(0, "device", 0)
    assert derive_seed(1, "profile", 0) != derive_seed(0, "profile", 0)


def _draws(scenario: Scenario) -> list[tuple[object, ...]]:
    out = []
    for plan in scenario.devices():
        p = scenario.profile(plan)
        battery = None if p.battery is None else (p.battery.level, p.battery.capacity_wh)
        online = [p.connectivity is None or p.connectivity.online(t) for t in range(0, 600, 7)]
        out.append((plan, battery, p.link, p.link_type, p.speed, tuple(online)))
    return out


def test_same_seed_gives_the_same_partition_and_profile_draws() -> None:
    a, b = load_scenario("flaky"), load_scenario("flaky")
    assert _draws(a) == _draws(b)
    c = load_scenario("flaky", seed=1)
    assert _draws(c) != _draws(a)

    def shards(s: Scenario) -> list[list[int]]:
        task = load_task(s.task.name, **s.task.task_options(s.seed))
        plans = s.devices()
        return [task.device_data(p.shard, p.num_shards).index.tolist() for p in plans]

    first = shards(a)
    assert first == shards(b)
    assert first != shards(c)
    assert sorted(i for shard in first for i in shard) == list(range(sum(map(len, first))))


def test_devices_per_gateway_may_be_a_distribution(tmp_path: Path) -> None:
    text = "[fleet]\ngateways = 6\ndevices_per_gateway = { dist = 'uniform', low = 2, high = 9 }"
    scenario = load_scenario(write(tmp_path, text))
    counts = scenario.devices_per_gateway()
    assert len(counts) == 6 and all(2 <= c <= 9 for c in counts) and len(set(counts)) > 1
    assert counts == load_scenario(write(tmp_path, text)).devices_per_gateway()


def test_trace_paths_are_relative_to_the_scenario_file(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "t.csv").write_text("start_s,end_s\n10,20\n")
    path = write(tmp_path, "[[profiles]]\ntrace = 'traces/t.csv'\n")
    scenario = load_scenario(path)
    profile = scenario.profile(scenario.devices()[0])
    assert profile.connectivity is not None
    assert profile.connectivity.online(5) and not profile.connectivity.online(15)


def test_node_settings_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFL_MQTT__BROKER", "elsewhere:1")
    monkeypatch.setenv("EDGEFL_SYNC_EVERY", "9")
    scenario = load_scenario(None)
    node = scenario.gateway_settings(0, [], broker="127.0.0.1:5", state_dir=Path("x"))
    assert node.mqtt.broker == "127.0.0.1:5"
    assert node.sync_every == 2
    device = scenario.device_settings(
        scenario.devices()[0], broker="127.0.0.1:5", state_dir=Path("x")
    )
    assert device.mqtt.broker == "127.0.0.1:5"
    assert device.torch_threads == 1


def test_every_node_starts_from_the_same_version_zero() -> None:
    scenario = load_scenario(None, seed=5)
    cloud = scenario.cloud_settings(broker="h:1", state_dir=Path("x"))
    gateway = scenario.gateway_settings(2, [], broker="h:1", state_dir=Path("x"))
    assert cloud.seed == gateway.seed == 5
    assert cloud.children == scenario.gateway_ids()
    assert cloud.rounds == scenario.rounds


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["simulate", "--rounds", "x"], "rounds"),
        (["simulate", "--devices", "0"], "--devices: "),
        (["simulate", "--time-scale", "-1"], "--time-scale: "),
        (["simulate", "--broker", "nowhere"], "--broker"),
        (["simulate", "--log-level", "loud"], "--log-level"),
        (["broker", "--port", "x"], "--port"),
        (["simulate", "large", "--devices", "1000"], "cannot fill 10000 shards"),
        (["simulate", "no/such/file.toml"], "not found"),
    ],
)
def test_bad_simulate_flags_exit_2_with_one_line(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err
    assert len(err.splitlines()) == 1


def test_flags_map_to_scenario_fields() -> None:
    import argparse

    args = argparse.Namespace(
        seed="3", rounds=None, devices="4", workers="1", time_scale="50", timeout=None
    )
    assert overrides_from_args(args) == {
        "seed": "3",
        "fleet.devices_per_gateway": "4",
        "workers": "1",
        "time_scale": "50",
    }
