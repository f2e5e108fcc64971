"""Battery, bandwidth and connectivity of a node: OS readers, simulated models, eligibility.

Readers only read and the policy only decides: nothing here trains, publishes or
sleeps. Simulated profiles are deterministic and run on an injected clock.
"""

from __future__ import annotations

import bisect
import csv
import functools
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Annotated, Any, Literal, Protocol

import psutil
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

log = logging.getLogger(__name__)

Link = Literal["ethernet", "wifi", "cellular", "unknown"]
LINKS: tuple[Link, ...] = ("ethernet", "wifi", "cellular", "unknown")


@dataclass
class Reading:
    """One look at a node's resources. ``battery`` is None on mains power."""

    battery: float | None = None
    charging: bool = True
    link: Link = "unknown"
    uplink_kbps: float | None = None
    cpu_temp_c: float | None = None
    mem_available_mb: float | None = None
    cuda: bool = False


# ------------------------------------------------------------------ OS readers


def read_battery() -> tuple[float, bool] | None:
    """``(level 0..1, charging)`` from psutil, or None for a mains-powered board."""
    try:
        battery = psutil.sensors_battery()
    except (AttributeError, OSError):  # platform without battery support
        return None
    if battery is None:
        return None
    return min(max(battery.percent / 100.0, 0.0), 1.0), bool(battery.power_plugged)


def link_of(interface: str) -> Link:
    """Link type from an interface name (Linux and common embedded naming)."""
    name = interface.lower()
    if name.startswith(("eth", "en")):
        return "ethernet"
    if name.startswith("wl"):
        return "wifi"
    if name.startswith(("wwan", "wwp", "rmnet", "ppp", "usb", "ccmni")):
        return "cellular"
    return "unknown"


def default_route_interface(route_file: str | Path = "/proc/net/route") -> str | None:
    """The interface of the lowest-metric default route, if the kernel table is readable."""
    try:
        lines = Path(route_file).read_text().splitlines()[1:]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        f = line.split()
        default_up = len(f) >= 7 and f[1] == "00000000" and int(f[3], 16) & 0x1  # RTF_UP
        if default_up and (best is None or int(f[6]) < best[0]):
            best = (int(f[6]), f[0])
    return best[1] if best else None


def read_link(route_file: str | Path = "/proc/net/route") -> Link:
    """Type of the interface carrying the default route, else of the best up interface.

    Without a route table, up non-loopback interfaces that have an address are
    ranked ethernet, wifi, cellular, unknown (so ``docker0`` never wins over ``wlan0``).
    """
    route = default_route_interface(route_file)
    if route is not None:
        return link_of(route)
    try:
        stats, addrs = psutil.net_if_stats(), psutil.net_if_addrs()
    except OSError:
        return "unknown"
    up = [n for n, s in stats.items() if s.isup and addrs.get(n) and n.rstrip("0123456789") != "lo"]
    ranked = sorted(up, key=lambda n: LINKS.index(link_of(n)))
    return link_of(ranked[0]) if ranked else "unknown"


def read_cpu_temp() -> float | None:
    """Hottest current sensor reading in °C, or None where the OS exposes none."""
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError):  # e.g. macOS and Windows have no such call
        return None
    temps = [
        t.current for ts in sensors.values() for t in ts if math.isfinite(t.current or math.nan)
    ]
    return max(temps) if temps else None


def read_memory_mb() -> float:
    return float(psutil.virtual_memory().available) / 2**20


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether torch sees a GPU; torch is imported lazily (seconds on a Pi) and only once."""
    try:
        import torch
    except (ImportError, OSError):  # OSError: a broken CUDA install on a Jetson
        return False
    found = bool(torch.cuda.is_available())
    log.debug("torch sees CUDA: %s", found)
    return found


class UplinkEstimator:
    """EWMA of observed upload speed; samples too small to time reliably are ignored."""

    def __init__(
        self, *, alpha: float = 0.3, min_bytes: int = 4096, min_seconds: float = 0.005
    ) -> None:
        self.alpha, self.min_bytes, self.min_seconds = alpha, min_bytes, min_seconds
        self.samples = 0
        self._kbps: float | None = None

    def record(self, nbytes: int, seconds: float) -> None:
        """One publish of ``nbytes`` that took ``seconds`` until its PUBACK."""
        if nbytes < self.min_bytes or not seconds >= self.min_seconds or math.isinf(seconds):
            return
        sample = nbytes * 8 / 1000 / seconds
        self._kbps = (
            sample if self._kbps is None else self._kbps + self.alpha * (sample - self._kbps)
        )
        self.samples += 1

    @property
    def kbps(self) -> float | None:
        return self._kbps


class OsReader:
    """A real board's Reading; every source is a callable so that tests can fake it."""

    def __init__(
        self,
        *,
        battery: Callable[[], tuple[float, bool] | None] = read_battery,
        link: Callable[[], Link] = read_link,
        cpu_temp: Callable[[], float | None] = read_cpu_temp,
        memory: Callable[[], float | None] = read_memory_mb,
        cuda: Callable[[], bool] = cuda_available,
        uplink: UplinkEstimator | None = None,
    ) -> None:
        self._battery, self._link, self._cpu_temp = battery, link, cpu_temp
        self._memory, self._cuda = memory, cuda
        self.uplink = uplink or UplinkEstimator()

    def read(self) -> Reading:
        battery = self._battery()
        level, charging = (None, True) if battery is None else battery  # mains counts as charging
        return Reading(
            battery=level,
            charging=charging,
            link=self._link(),
            uplink_kbps=self.uplink.kbps,
            cpu_temp_c=self._cpu_temp(),
            mem_available_mb=self._memory(),
            cuda=self._cuda(),
        )


# ------------------------------------------------------------------ eligibility

OK = "ok"
BATTERY_LOW = "battery_low"
LINK_NOT_ALLOWED = "link_not_allowed"
TOO_HOT = "too_hot"
LOW_MEMORY = "low_memory"
UPLINK_TOO_SLOW = "uplink_too_slow"
REASONS = (OK, BATTERY_LOW, LINK_NOT_ALLOWED, TOO_HOT, LOW_MEMORY, UPLINK_TOO_SLOW)


class HasProfile(Protocol):
    """What the policy needs: a Reading, or the ``wire.Status`` a child published."""

    @property
    def battery(self) -> float | None: ...
    @property
    def charging(self) -> bool: ...
    @property
    def link(self) -> str: ...
    @property
    def uplink_kbps(self) -> float | None: ...


@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


class EligibilityPolicy(BaseModel):
    """Whether a node should train this round; devices and aggregators share it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_battery: float = Field(0.3, ge=0, le=1, description="lowest level; ignored when charging")
    allowed_links: tuple[Link, ...] = Field(LINKS, description="link types allowed to train")
    max_temp_c: float | None = Field(80.0, description="CPU temperature cap; None disables")
    min_mem_mb: float = Field(0.0, ge=0, description="least available memory in MiB")

    def decide(
        self, profile: HasProfile, *, expected_bytes: int = 0, deadline_s: float | None = None
    ) -> Decision:
        """The first failed check, in the order of ``REASONS``; unknown values pass.

        ``uplink_too_slow``: ``expected_bytes`` would not be sent by ``deadline_s``
        at the known ``uplink_kbps``. Temperature and memory are read only if the
        profile has them (a ``Status`` does not).
        """
        battery = profile.battery
        if not profile.charging and battery is not None and battery < self.min_battery:
            return Decision(False, BATTERY_LOW)
        if profile.link not in self.allowed_links:
            return Decision(False, LINK_NOT_ALLOWED)
        temp = getattr(profile, "cpu_temp_c", None)
        if self.max_temp_c is not None and temp is not None and temp > self.max_temp_c:
            return Decision(False, TOO_HOT)
        mem = getattr(profile, "mem_available_mb", None)
        if mem is not None and mem < self.min_mem_mb:
            return Decision(False, LOW_MEMORY)
        kbps = profile.uplink_kbps
        if deadline_s is None or expected_bytes <= 0 or kbps is None:
            return Decision(True, OK)
        if kbps <= 0 or expected_bytes * 8 / 1000 / kbps > deadline_s:
            return Decision(False, UPLINK_TOO_SLOW)
        return Decision(True, OK)


# ------------------------------------------------------------ simulated models


class SimBattery:
    """Battery level as a fraction, drained by work and filled on a charging schedule.

    Charging happens during the first ``charge_duty`` of every ``charge_period_s``
    (shifted by ``charge_offset_s``): duty 0 never charges, duty 1 always does.
    """

    def __init__(
        self,
        *,
        capacity_wh: float = 10.0,
        level: float = 1.0,
        drain_per_train_s: float = 2e-4,
        drain_per_mb: float = 5e-4,
        charge_period_s: float = 86_400.0,
        charge_duty: float = 0.0,
        charge_offset_s: float = 0.0,
        charge_rate: float = 5e-4,
        now: float = 0.0,
    ) -> None:
        if capacity_wh <= 0 or charge_period_s <= 0 or not 0 <= charge_duty <= 1:
            raise ValueError("need capacity_wh > 0, charge_period_s > 0, 0 <= charge_duty <= 1")
        self.capacity_wh, self.level = capacity_wh, min(max(level, 0.0), 1.0)
        self.drain_per_train_s, self.drain_per_mb = drain_per_train_s, drain_per_mb
        self.charge_period_s, self.charge_duty = charge_period_s, charge_duty
        self.charge_offset_s, self.charge_rate = charge_offset_s, charge_rate
        self.energy_used_wh = 0.0
        self._now = now

    def charging_at(self, t: float) -> bool:
        phase = (t - self.charge_offset_s) % self.charge_period_s
        return phase < self.charge_duty * self.charge_period_s

    @property
    def charging(self) -> bool:
        """Whether the battery is charging at the time of the last ``tick``."""
        return self.charging_at(self._now)

    def tick(self, now: float) -> None:
        """Advance to ``now``, adding the charge of every charging second since the last tick."""
        if now <= self._now:
            return
        charged = self._charge_seconds(now) - self._charge_seconds(self._now)
        self.level = min(1.0, self.level + charged * self.charge_rate)
        self._now = now

    def spend_training(self, seconds: float) -> None:
        """Drain for ``seconds`` of training at speed 1 (the work, not the wall time)."""
        self._drain(seconds * self.drain_per_train_s)

    def spend_upload(self, nbytes: int) -> None:
        self._drain(nbytes / 1e6 * self.drain_per_mb)

    def _drain(self, fraction: float) -> None:
        used = min(max(fraction, 0.0), self.level)
        self.level -= used
        self.energy_used_wh += used * self.capacity_wh

    def _charge_seconds(self, t: float) -> float:
        """Charging seconds from the schedule's origin to ``t`` (an antiderivative)."""
        on = self.charge_duty * self.charge_period_s
        periods, phase = divmod(t - self.charge_offset_s, self.charge_period_s)
        return periods * on + min(phase, on)


@dataclass(frozen=True)
class SimLink:
    """Bandwidth in kbit/s (1000 bit/s) and one-way latency; delays in simulated seconds."""

    up_kbps: float
    down_kbps: float
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.up_kbps <= 0 or self.down_kbps <= 0 or self.latency_ms < 0:
            raise ValueError(f"bad link {self}")

    def upload_delay_s(self, nbytes: int) -> float:
        return self.latency_ms / 1000 + nbytes * 8 / 1000 / self.up_kbps

    def download_delay_s(self, nbytes: int) -> float:
        return self.latency_ms / 1000 + nbytes * 8 / 1000 / self.down_kbps


class Connectivity(Protocol):
    def online(self, now: float) -> bool: ...


class MarkovConnectivity:
    """On/off Markov chain in steps of ``step_s``; each step online drops with ``p_drop``.

    The state at a step depends only on the seed and the step, not on when or how
    often it is asked: sojourns are drawn as geometric lengths, so a jump far ahead
    costs one draw per switch rather than per step. Long-run online fraction is
    ``p_recover / (p_drop + p_recover)``.
    """

    def __init__(
        self,
        p_drop: float,
        p_recover: float,
        step_s: float = 1.0,
        seed: int = 0,
        *,
        start_online: bool = True,
    ) -> None:
        if not (0 <= p_drop <= 1 and 0 <= p_recover <= 1 and step_s > 0):
            raise ValueError("need 0 <= p_drop, p_recover <= 1 and step_s > 0")
        self.p_drop, self.p_recover, self.step_s = p_drop, p_recover, step_s
        self.start_online = start_online
        self._rng = random.Random(seed)
        self._switches: list[float] = []  # steps at which the state flips
        self._horizon = 0.0

    def online(self, now: float) -> bool:
        step = max(0, math.floor(now / self.step_s))
        while self._horizon <= step:
            online = self.start_online != (len(self._switches) % 2 == 1)
            self._horizon += self._sojourn(self.p_drop if online else self.p_recover)
            self._switches.append(self._horizon)
        return self.start_online != (bisect.bisect_right(self._switches, step) % 2 == 1)

    def _sojourn(self, p: float) -> float:
        if p <= 0:
            return math.inf
        u = 1.0 - self._rng.random()  # (0, 1]
        return 1.0 if p >= 1 else math.floor(math.log(u) / math.log1p(-p)) + 1.0


class TraceConnectivity:
    """Offline windows ``[start_s, end_s)`` from a measured trace; online elsewhere."""

    def __init__(self, intervals: Iterable[tuple[float, float]]) -> None:
        merged: list[list[float]] = []
        for start, end in sorted((float(a), float(b)) for a, b in intervals):
            if end <= start:
                raise ValueError(f"offline window ends before it starts: {start}, {end}")
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [w[0] for w in merged]
        self._ends = [w[1] for w in merged]

    @classmethod
    def from_csv(cls, path: str | Path) -> TraceConnectivity:
        """Rows ``start_s,end_s``; a header row, blank lines and ``#`` comments are skipped."""
        rows = []
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if not row or row[0].lstrip().startswith("#"):
                    continue
                try:
                    rows.append((float(row[0]), float(row[1])))
                except (ValueError, IndexError):
                    if rows:  # only the first row may be a header
                        raise ValueError(f"{path}: bad row {row}") from None
        return cls(rows)

    def online(self, now: float) -> bool:
        i = bisect.bisect_right(self._starts, now) - 1
        return i < 0 or now >= self._ends[i]


@dataclass
class SimProfile:
    """One simulated device's resources, usually drawn from a ProfileSpec."""

    battery: SimBattery | None  # None: mains-powered
    link: SimLink
    link_type: Link = "wifi"
    connectivity: Connectivity | None = None  # None: always online
    speed: float = 1.0  # compute speed factor: training takes (time at speed 1) / speed
    cpu_temp_c: float | None = None
    mem_available_mb: float | None = None
    cuda: bool = False


class SimReader:
    """A simulated device's Reading at the injected clock's time, for the same policy."""

    def __init__(self, profile: SimProfile, clock: Callable[[], float]) -> None:
        self.profile, self._clock = profile, clock

    def online(self) -> bool:
        c = self.profile.connectivity
        return c is None or c.online(self._clock())

    def read(self) -> Reading:
        p = self.profile
        if p.battery is not None:
            p.battery.tick(self._clock())
        return Reading(
            battery=None if p.battery is None else p.battery.level,
            charging=True if p.battery is None else p.battery.charging,
            link=p.link_type,
            uplink_kbps=p.link.up_kbps,
            cpu_temp_c=p.cpu_temp_c,
            mem_available_mb=p.mem_available_mb,
            cuda=p.cuda,
        )


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
