"""Every gateway and cloud settings file in the deploy kits loads, and means what it says."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgefl.config import AggregatorSettings, DeviceSettings, load_settings
from edgefl.tasks import load_task

REPO = Path(__file__).resolve().parents[2]
KITS = sorted([*REPO.glob("gateways/*.toml"), *REPO.glob("cloud/*.toml")])


def test_the_kits_ship_a_gateway_and_a_cloud() -> None:
    assert {p.relative_to(REPO).as_posix() for p in KITS} >= {
        "gateways/gateway.toml",
        "cloud/cloud.toml",
    }


@pytest.mark.parametrize("path", KITS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_kit_loads_as_aggregator_settings(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("EDGEFL_")]:
        monkeypatch.delenv(name)  # the file alone, not this shell's overrides
    settings = load_settings(AggregatorSettings, path)
    role = "cloud" if path.parent.name == "cloud" else "gateway"
    assert settings.role == role
    assert (settings.parent is None) == (role == "cloud")
    assert settings.checkpoint and settings.task


@pytest.mark.parametrize("path", KITS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_kit_requires_signed_updates_and_says_where_the_model_keys_go(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("EDGEFL_")]:
        monkeypatch.delenv(name)
    settings = load_settings(AggregatorSettings, path)
    assert settings.require_signature  # unsigned updates are refused
    text = path.read_text()
    assert "EDGEFL_MODEL_KEY" in text and "model_key" in text  # a secret: not in the file
    if settings.role == "gateway":
        assert "parent_key" in text and settings.max_version_jump == 100


def test_cloud_waits_longer_than_a_gateway_sync_cycle() -> None:
    gateway = load_settings(AggregatorSettings, REPO / "gateways" / "gateway.toml")
    cloud = load_settings(AggregatorSettings, REPO / "cloud" / "cloud.toml")
    assert cloud.train.deadline_s >= gateway.sync_every * gateway.train.deadline_s
    assert (cloud.task, cloud.seed) == (gateway.task, gateway.seed)  # deltas line up


@pytest.mark.parametrize("unit", ["gateways/edgefl-gateway.service", "cloud/edgefl-cloud.service"])
def test_systemd_unit_runs_its_tier_with_its_kit_file(unit: str) -> None:
    text = (REPO / unit).read_text()
    role = "cloud" if unit.startswith("cloud") else "gateway"
    assert f"edgefl {role} --config /etc/edgefl/{role}.toml" in text
    assert "Restart=always" in text and "KillSignal=SIGTERM" in text


def test_every_kit_runs_the_same_task_with_the_same_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device whose task options differ cannot load its node's model (model_mismatch)."""
    for name in [n for n in os.environ if n.startswith("EDGEFL_")]:
        monkeypatch.delenv(name)
    devices = sorted(REPO.glob("devices/*.toml"))
    assert len(devices) >= 2
    kits = [load_settings(AggregatorSettings, p) for p in KITS]
    kits += [load_settings(DeviceSettings, p) for p in devices]
    assert {(k.task, json.dumps(k.task_options, sort_keys=True)) for k in kits} == {
        (kits[0].task, json.dumps(kits[0].task_options, sort_keys=True))
    }
    specs = {tuple(load_task(k.task, **k.task_options).spec().items()) for k in kits}
    assert len(specs) == 1
