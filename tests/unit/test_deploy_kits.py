"""The board deploy kit in devices/ stays valid: every TOML loads, the unit runs what it says."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from edgefl.cli import build_parser
from edgefl.config import DeviceSettings, load_settings

DEVICES = Path(__file__).resolve().parents[2] / "devices"
KITS = sorted(DEVICES.glob("*.toml"))


def _unit() -> dict[str, list[str]]:
    """``key -> values`` of the systemd unit (keys may repeat, e.g. Environment=)."""
    entries: dict[str, list[str]] = {}
    for line in (DEVICES / "edgefl-device.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key, []).append(value)
    return entries


def test_there_is_a_kit_for_each_board_type() -> None:
    assert {p.name for p in KITS} >= {"raspberry-pi.toml", "jetson.toml"}


@pytest.mark.parametrize("path", KITS, ids=lambda p: p.name)
def test_every_kit_loads_as_device_settings(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("EDGEFL_")]:
        monkeypatch.delenv(name)
    settings = load_settings(DeviceSettings, path)
    assert settings.state_dir == Path("/var/lib/edgefl")
    assert settings.update_codec in ("auto", "u8") and settings.error_feedback


@pytest.mark.parametrize("path", KITS, ids=lambda p: p.name)
def test_every_kit_bounds_what_a_model_may_ask_and_says_where_the_keys_go(path: Path) -> None:
    settings = load_settings(DeviceSettings, path)
    assert settings.max_epochs <= 20 and settings.min_batch_size >= 8
    assert settings.max_train_s <= 300 and settings.max_version_jump <= 100
    text = path.read_text()
    assert "hmac_key" in text and "parent_key" in text and "--parent" in text


def test_the_jetson_kit_trains_on_cuda_in_fp16_and_the_pi_on_the_cpu() -> None:
    jetson = load_settings(DeviceSettings, DEVICES / "jetson.toml")
    pi = load_settings(DeviceSettings, DEVICES / "raspberry-pi.toml")
    assert (jetson.compute, jetson.precision) == ("cuda", "fp16")
    assert (pi.compute, pi.precision) == ("cpu", "fp32")


def test_the_unit_restarts_on_failure_and_keeps_state_in_var_lib(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unit = _unit()
    assert unit["Restart"] == ["on-failure"]
    assert unit["StateDirectory"] == ["edgefl"]
    assert unit["RestartPreventExitStatus"] == ["2"]  # the CLI's exit code for a bad config
    env = dict(value.partition("=")[::2] for value in unit["Environment"])
    assert env["EDGEFL_STATE_DIR"] == "/var/lib/edgefl"
    # The variable the unit sets is the one the agent reads, and it beats the file.
    monkeypatch.setenv("EDGEFL_STATE_DIR", "/srv/edgefl")
    assert load_settings(DeviceSettings, KITS[0]).state_dir == Path("/srv/edgefl")


def test_the_unit_starts_the_device_command_with_the_etc_config() -> None:
    (command,) = _unit()["ExecStart"]
    program, *args = shlex.split(command)
    assert Path(program).name == "edgefl"
    assert args == ["device", "--config", "/etc/edgefl/device.toml"]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "device" and parsed.config == "/etc/edgefl/device.toml"
