"""Scenario files: the typed schema of ``simulators/*.toml`` and the fleet it describes.

A scenario says how many gateways and devices, how the data is split, which
profiles devices draw, and how every tier is configured. Loading only parses
and validates; drawing a fleet is a pure function of the scenario and its seed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import (
    AggregatorSettings,
    ConfigError,
    DeviceSettings,
    describe_error,
    values_only,
)
from ..profiles import Dist, ProfileSpec, SimProfile, draw_profile

#: Settings the simulator owns: a scenario may not set them per tier.
RESERVED = {
    "aggregator": ("id", "role", "parent", "children", "mqtt", "state_dir", "rounds"),
    "device": ("id", "gateway", "shard", "num_shards", "mqtt", "state_dir"),
}
Attack = Literal["none", "scale", "nan", "sign_flip"]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSpec(_Schema):
    """The learning task and how its training data is split over devices."""

    name: str = Field("digits", description="built-in task name or 'module:attribute'")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options")
    partition: Literal["iid", "dirichlet", "shards", "task"] = Field(
        "iid", description="how samples are split; 'task': leave it to the task's options"
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (non-IID when small)")

    def task_options(self, seed: int) -> dict[str, Any]:
        """Options for ``load_task``: the partition is the scenario's, seeded by it."""
        if self.partition == "task":
            return dict(self.options)
        return {"partition": self.partition, "alpha": self.alpha, "seed": seed, **self.options}


class FleetSpec(_Schema):
    """How many gateways, and how many devices each."""

    gateways: int = Field(4, ge=1, le=10_000)
    devices_per_gateway: int | Dist = Field(
        10, description="a number, or a distribution drawn per gateway (rounded, at least 1)"
    )

    @field_validator("devices_per_gateway")
    @classmethod
    def _count(cls, v: int | Dist) -> int | Dist:
        if isinstance(v, int) and v < 1:
            raise ValueError("need at least 1 device per gateway")
        return v


class Cohort(ProfileSpec):
    """A share of the devices with their own profile distributions, and maybe an attack."""

    name: str = Field("devices", min_length=1, max_length=32)
    share: float = Field(1.0, gt=0, description="relative share of devices in this cohort")
    attack: Attack = Field("none", description="what these devices do to their updates")
    attack_scale: float = Field(20.0, description="factor of the 'scale' attack")


class Scenario(_Schema):
    """One fleet simulation: every field has a default, so an empty file is a small fleet."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    seed: int = Field(0, ge=0, description="fixes the partition, the profiles and training")
    rounds: int = Field(20, ge=1, description="cloud rounds to run")
    time_scale: float = Field(
        1.0, gt=0, description="simulated seconds per real second (100: 100x faster than life)"
    )
    workers: int = Field(0, ge=0, description="device processes; 0: one per core")
    timeout_s: float = Field(600.0, gt=0, description="stop and report after this long")
    target_accuracy: float | None = Field(
        None, ge=0, le=1, description="stop early once the cloud reaches it"
    )
    task: TaskSpec = Field(default_factory=TaskSpec)
    fleet: FleetSpec = Field(default_factory=FleetSpec)
    cloud: dict[str, Any] = Field(default_factory=dict, description="cloud node settings")
    gateway: dict[str, Any] = Field(default_factory=dict, description="every gateway's settings")
    device: dict[str, Any] = Field(default_factory=dict, description="every device's settings")
    profiles: list[Cohort] = Field(default_factory=lambda: [Cohort()], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        names = [c.name for c in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"profile names must differ, got {names}")
        _reserved(self.cloud, "aggregator", "cloud")
        _reserved(self.gateway, "aggregator", "gateway")
        _reserved(self.device, "device", "device")
        # Build one node of each tier now, so that a bad setting fails at load time.
        broker, here = "127.0.0.1:1883", Path(".")
        for section, build in (
            ("cloud", lambda: self.cloud_settings(broker=broker, state_dir=here)),
            ("gateway", lambda: self.gateway_settings(0, [], broker=broker, state_dir=here)),
            ("device", lambda: self.device_settings(_device(0), broker=broker, state_dir=here)),
        ):
            try:
                build()
            except ValidationError as exc:
                raise ValueError(f"[{section}] {describe_error(exc)}") from None
        return self

    # ------------------------------------------------------------ the fleet
    def gateway_ids(self) -> list[str]:
        return [gateway_id(g) for g in range(self.fleet.gateways)]

    def devices(self) -> list[DevicePlan]:
        """Every device: gateway, shard, cohort and profile seed; a pure function of ``seed``."""
        counts = self.devices_per_gateway()
        total = sum(counts)
        cohorts = assign_cohorts([c.share for c in self.profiles], total, self.seed)
        plans = []
        index = 0
        for g, count in enumerate(counts):
            for _ in range(count):
                plans.append(
                    DevicePlan(
                        id=device_id(index),
                        gateway=gateway_id(g),
                        shard=index,
                        num_shards=total,
                        cohort=cohorts[index],
                        profile_seed=derive_seed(self.seed, "profile", index),
                    )
                )
                index += 1
        return plans

    def devices_per_gateway(self) -> list[int]:
        per = self.fleet.devices_per_gateway
        if isinstance(per, int):
            return [per] * self.fleet.gateways
        rng = random.Random(derive_seed(self.seed, "fleet", 0))
        return [max(1, round(per.at(rng.random()))) for _ in range(self.fleet.gateways)]

    def profile(self, plan: DevicePlan) -> SimProfile:
        """The device's simulated resources, drawn from its cohort with its own seed."""
        return draw_profile(self.profiles[plan.cohort], plan.profile_seed)

    # ----------------------------------------------------- settings per node
    def cloud_settings(self, *, broker: str, state_dir: Path, **extra: Any) -> AggregatorSettings:
        fields = {"rounds": self.rounds, **self.cloud, **extra}
        return build_settings(
            AggregatorSettings,
            fields,
            id="cloud",
            role="cloud",
            parent=None,
            children=self.gateway_ids(),
            mqtt={"broker": broker},
            state_dir=state_dir,
            seed=self.seed,
        )

    def gateway_settings(
        self, index: int, children: list[str], *, broker: str, state_dir: Path, **extra: Any
    ) -> AggregatorSettings:
        gid = gateway_id(index)
        return build_settings(
            AggregatorSettings,
            {**self.gateway, **extra},
            id=gid,
            role="gateway",
            parent="cloud",
            children=children,
            mqtt={"broker": broker},
            state_dir=state_dir,
            # Every node starts from the same version 0: init_params(seed).
            seed=self.seed,
        )

    def device_settings(
        self, plan: DevicePlan, *, broker: str, state_dir: Path, **extra: Any
    ) -> DeviceSettings:
        return build_settings(
            DeviceSettings,
            {"torch_threads": 1, "compute": "cpu", **self.device, **extra},
            id=plan.id,
            gateway=plan.gateway,
            shard=plan.shard,
            num_shards=plan.num_shards,
            mqtt={"broker": broker},
            state_dir=state_dir,
            seed=derive_seed(self.seed, "device", plan.shard) % 2**31,
        )


@dataclass(frozen=True)
class DevicePlan:
    """Where one simulated device sits in the fleet; cheap to send to a worker."""

    id: str
    gateway: str
    shard: int
    num_shards: int
    cohort: int
    profile_seed: int


def gateway_id(index: int) -> str:
    return f"gw-{index + 1}"


def device_id(index: int) -> str:
    return f"dev-{index + 1:05d}"


def _device(index: int) -> DevicePlan:
    return DevicePlan(device_id(index), gateway_id(0), index, index + 1, 0, 0)


def derive_seed(seed: int, purpose: str, index: int) -> int:
    """Independent, reproducible 63-bit seeds per purpose and index (no Python ``hash``)."""
    key = [seed, index, *purpose.encode()]
    return int(np.random.SeedSequence(key).generate_state(2, np.uint64)[0] >> np.uint64(1))


def assign_cohorts(shares: list[float], total: int, seed: int) -> list[int]:
    """Cohort index of each of ``total`` devices: exact counts by share, shuffled by seed.

    Counts follow the largest remainder, so 5% of 40 devices is exactly 2 of them.
    """
    weights = np.asarray(shares, dtype=float) / sum(shares)
    exact = weights * total
    counts = np.floor(exact).astype(int)
    leftover = total - int(counts.sum())
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:leftover]:
        counts[i] += 1
    labels = np.repeat(np.arange(len(shares)), counts)
    rng = np.random.default_rng(derive_seed(seed, "cohorts", 0))
    return [int(c) for c in rng.permutation(labels)]


# -------------------------------------------------------------- settings


def _reserved(fields: Mapping[str, Any], kind: str, section: str) -> None:
    taken = sorted(set(fields) & set(RESERVED[kind]) - {"mqtt"})
    if taken:
        raise ValueError(f"[{section}] {', '.join(taken)}: set by the simulator, not the scenario")
    mqtt = fields.get("mqtt", {})
    if isinstance(mqtt, Mapping) and "broker" in mqtt:
        raise ValueError(f"[{section}] mqtt.broker: set by the simulator (use --broker)")


def build_settings(cls: type[Any], fields: Mapping[str, Any], **fixed: Any) -> Any:
    """Settings from the scenario alone: ``EDGEFL_*`` variables must not reach a simulated node."""
    return values_only(cls)(**_merge(dict(fields), fixed))


def _merge(base: dict[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in fixed.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def describe(scenario: Scenario) -> str:
    """One line: the fleet at a glance."""
    counts = scenario.devices_per_gateway()
    cohorts = ", ".join(f"{c.name} {c.share:g}" for c in scenario.profiles)
    per = counts[0] if len(set(counts)) == 1 else f"{min(counts)}-{max(counts)}"
    return (
        f"{scenario.name}: 1 cloud, {len(counts)} gateways, {sum(counts)} devices "
        f"({per} per gateway), {scenario.rounds} rounds, {scenario.task.name} "
        f"{scenario.task.partition}, profiles: {cohorts}, time x{scenario.time_scale:g}"
    )


__all__ = [
    "Cohort",
    "ConfigError",
    "DevicePlan",
    "FleetSpec",
    "Scenario",
    "TaskSpec",
    "assign_cohorts",
    "derive_seed",
]
