"""OS readers for real boards (psutil, /proc, torch) and the uplink estimate.

They only read: nothing here trains, publishes or sleeps.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import psutil

from .reading import LINKS, Link, Reading

log = logging.getLogger(__name__)

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
