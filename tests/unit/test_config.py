from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgefl.cli import main
from edgefl.config import AggregatorSettings, ConfigError, DeviceSettings, load_settings, nest


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "role.toml"
    path.write_text(text)
    return path


def test_flags_override_environment_which_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _toml(
        tmp_path,
        'id = "dev-1"\ngateway = "gw-file"\nheartbeat_s = 5\n[mqtt]\nbroker = "10.0.0.1:1883"\n',
    )
    monkeypatch.setenv("EDGEFL_GATEWAY", "gw-env")
    monkeypatch.setenv("EDGEFL_MQTT__BROKER", "10.0.0.2:1883")
    s = load_settings(DeviceSettings, path, nest({"mqtt.broker": "10.0.0.3:1883"}))
    assert s.gateway == "gw-env"  # env beats file
    assert s.mqtt.broker == "10.0.0.3:1883"  # flag beats env
    assert s.heartbeat_s == 5  # the file still fills what nobody else set
    assert s.mqtt.keepalive_s == 30  # defaults fill the rest


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('id = "bad id"', "id: Value error"),
        ('id = "d"\nbogus = 1', "bogus: unknown setting"),
        ('id = "d"\n[mqtt]\nbroker = "nohost"', "mqtt.broker"),
        ('id = "d"\nshard = -1', "shard"),
        ("id = ", "role.toml"),
    ],
)
def test_bad_settings_raise_one_readable_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(DeviceSettings, _toml(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(DeviceSettings, tmp_path / "nope.toml")


def test_aggregator_training_section_nests() -> None:
    s = load_settings(AggregatorSettings, None, nest({"id": "cloud", "train.epochs": "3"}))
    assert s.train.epochs == 3 and s.train.lr == 0.05


def test_cli_bad_flag_value_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "--id", "gw-1", "--train-epochs", "many"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgefl gateway: error: --train-epochs: ")
    assert len(err.splitlines()) == 1


def test_help_lists_every_setting_with_its_default() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgefl.cli", "device", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200", "PATH": ""},
    ).stdout
    for flag, default in (
        ("--broker", "127.0.0.1:1883"),
        ("--heartbeat-s", "30.0"),
        ("--policy-min-battery", "0.3"),
        ("--update-codec", "auto"),
    ):
        assert flag in out
        assert f"(default: {default!r})" in out or f"(default: {default})" in out


def test_ci_runs_the_readme_test_command() -> None:
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text().replace("$SUDO ", "").replace(" -qq", "")
    ci = ci.replace(" -q ", " ").replace(" -q", "")
    command = readme.split("```bash", 3)[2].split("```", 1)[0].strip()
    assert "pytest" in command
    for step in command.split(" && "):
        step = step.replace("$(command -v sudo) ", "").replace(" -qq", "").replace(" -q", "")
        assert step.split()[0] in ci and all(word in ci for word in step.split()), step


def test_sections_merge_key_by_key_and_a_map_setting_is_replaced_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _toml(
        tmp_path,
        'id = "gw-1"\nkeys = { "dev-1" = "' + "ab" * 16 + '", "dev-2" = "' + "cd" * 16 + '" }\n'
        '[mqtt]\nusername = "gw-1"\n',
    )
    monkeypatch.setenv("EDGEFL_MQTT__PASSWORD", "secret")
    monkeypatch.setenv("EDGEFL_KEYS", '{"dev-3": "' + "ef" * 16 + '"}')
    s = load_settings(AggregatorSettings, path)
    assert (s.mqtt.username, s.mqtt.password) == ("gw-1", "secret")
    assert s.keys == {"dev-3": "ef" * 16}  # the variable's map, not a blend of the two
