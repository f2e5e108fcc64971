"""Scenario-file profile specs: distributions to draw each simulated device from.

Seeded draws only; nothing here runs a device.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from pathlib import Path
from statistics import NormalDist
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .reading import Link
from .sim import MarkovConnectivity, SimBattery, SimLink, SimProfile, TraceConnectivity

log = logging.getLogger(__name__)

# --------------------------------------------------------------- scenario specs


class SupportsRandom(Protocol):
    def random(self) -> float: ...


class Dist(BaseModel):
    """A number drawn per device. A bare number in a scenario file means ``const``.

    ``uniform``: ``low``..``high``. ``normal``: ``mean``, ``sigma``. ``lognormal``:
    ``mean`` is the mean of the values themselves (not of their log) and ``sigma``
    the std of their log. ``low``/``high``, where given, clip normal and lognormal draws.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dist: Literal["const", "uniform", "normal", "lognormal"] = "const"
    value: float | None = None
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    sigma: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _complete(self) -> Dist:
        need = {
            "const": ("value",),
            "uniform": ("low", "high"),
            "normal": ("mean", "sigma"),
            "lognormal": ("mean", "sigma"),
        }[self.dist]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"{self.dist} needs {', '.join(missing)}")
        if self.dist == "lognormal" and (self.mean or 0) <= 0:
            raise ValueError("lognormal needs mean > 0")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError("low > high")
        return self

    def at(self, u: float) -> float:
        """The value at quantile ``u`` (0..1): each field spends one uniform, whatever its dist."""
        lo = -math.inf if self.low is None else self.low
        hi = math.inf if self.high is None else self.high
        if self.dist == "const":
            return self.value or 0.0
        if self.dist == "uniform":
            return lo + u * (hi - lo)
        z = NormalDist().inv_cdf(min(max(u, 1e-12), 1 - 1e-12))
        mean, sigma = self.mean or 0.0, self.sigma or 0.0
        if self.dist == "lognormal":
            return min(max(math.exp(math.log(mean) - sigma**2 / 2 + sigma * z), lo), hi)
        return min(max(mean + sigma * z, lo), hi)


def _number_is_const(v: Any) -> Any:
    return {"value": v} if isinstance(v, int | float) and not isinstance(v, bool) else v


Num = Annotated[Dist, BeforeValidator(_number_is_const)]


def _num(default: float, doc: str) -> Any:
    return Field(default_factory=lambda: Dist(value=default), description=doc)


class ProfileSpec(BaseModel):
    """Per-device profile distributions of a scenario file (each number may be a Dist)."""

    model_config = ConfigDict(extra="forbid")

    mains_powered: float = Field(0.0, ge=0, le=1, description="share of devices on mains power")
    capacity_wh: Num = _num(10.0, "battery capacity, Wh (only scales energy_used_wh)")
    battery_level: Num = _num(1.0, "starting level, 0..1")
    drain_per_train_s: Num = _num(2e-4, "level lost per second of training at speed 1")
    drain_per_mb: Num = _num(5e-4, "level lost per MB (1e6 bytes) uploaded")
    charge_period_s: Num = _num(86_400.0, "length of one charging cycle, s")
    charge_duty: Num = _num(0.0, "charging share of each cycle: 0 never, 1 always")
    charge_offset_s: Num = _num(0.0, "shift of the cycle, to spread devices over the day")
    charge_rate: Num = _num(5e-4, "level gained per second while charging")
    link: Link | dict[Link, float] = Field("wifi", description="a link type, or type -> weight")
    uplink_kbps: Num = _num(2_000.0, "uplink bandwidth, kbit/s")
    downlink_kbps: Num = _num(10_000.0, "downlink bandwidth, kbit/s")
    latency_ms: Num = _num(30.0, "one-way latency added to every transfer, ms")
    p_drop: Num = _num(0.0, "chance per step that an online device goes offline")
    p_recover: Num = _num(1.0, "chance per step that an offline device comes back")
    connectivity_step_s: float = Field(10.0, gt=0, description="Markov step, s")
    trace: Path | None = Field(None, description="CSV of offline windows; replaces the chain")
    speed: Num = _num(1.0, "compute speed factor: training time at speed 1 / speed")
    cpu_temp_c: Num | None = Field(None, description="reported CPU temperature, °C")
    mem_available_mb: Num | None = Field(None, description="reported available memory, MiB")
    cuda: bool = Field(False, description="reported CUDA availability")

    @field_validator("link")
    @classmethod
    def _weights(cls, v: Link | dict[Link, float]) -> Link | dict[Link, float]:
        if isinstance(v, dict) and (any(w < 0 for w in v.values()) or sum(v.values()) <= 0):
            raise ValueError("link weights must be >= 0 with a positive sum")
        return v


def draw_profile(spec: ProfileSpec, rng: int | SupportsRandom) -> SimProfile:
    """One device's profile. Every field takes exactly one uniform from ``rng``, in a
    fixed order, so the same seed gives the same fleet and changing one field's
    distribution leaves the other fields' draws unchanged."""
    gen = random.Random(rng) if isinstance(rng, int) else rng
    u = {name: gen.random() for name in _DRAW_ORDER}

    def num(name: str, lo: float = 0.0, hi: float = math.inf) -> float:
        return min(max(getattr(spec, name).at(u[name]), lo), hi)

    battery = SimBattery(
        capacity_wh=num("capacity_wh", 1e-6),
        level=num("battery_level", 0.0, 1.0),
        drain_per_train_s=num("drain_per_train_s"),
        drain_per_mb=num("drain_per_mb"),
        charge_period_s=num("charge_period_s", 1e-6),
        charge_duty=num("charge_duty", 0.0, 1.0),
        charge_offset_s=num("charge_offset_s", -math.inf),
        charge_rate=num("charge_rate"),
    )
    connectivity = (
        TraceConnectivity.from_csv(spec.trace)
        if spec.trace is not None
        else MarkovConnectivity(
            num("p_drop", 0.0, 1.0),
            num("p_recover", 0.0, 1.0),
            spec.connectivity_step_s,
            seed=int(u["seed"] * 2**53),
        )
    )
    return SimProfile(
        battery=None if u["mains_powered"] < spec.mains_powered else battery,
        link=SimLink(num("uplink_kbps", 1e-3), num("downlink_kbps", 1e-3), num("latency_ms")),
        link_type=_choose(spec.link, u["link"]),
        connectivity=connectivity,
        speed=num("speed", 1e-3),
        cpu_temp_c=None if spec.cpu_temp_c is None else num("cpu_temp_c", -math.inf),
        mem_available_mb=None if spec.mem_available_mb is None else num("mem_available_mb"),
        cuda=spec.cuda,
    )


_DRAW_ORDER = (
    "mains_powered", "capacity_wh", "battery_level", "drain_per_train_s", "drain_per_mb",
    "charge_period_s", "charge_duty", "charge_offset_s", "charge_rate", "link", "uplink_kbps",
    "downlink_kbps", "latency_ms", "p_drop", "p_recover", "seed", "speed", "cpu_temp_c",
    "mem_available_mb",
)  # fmt: skip


def _choose(link: Link | Mapping[Link, float], u: float) -> Link:
    if isinstance(link, str):
        return link
    total = sum(link.values())
    acc = 0.0
    for name, weight in link.items():
        acc += weight / total
        if u < acc:
            return name
    return next(reversed(list(link)))
