"""Simulated devices: a real DeviceAgent each, its profile applied through the agent's hooks.

The profile drawn for a device becomes its reader (battery, link), its
``online`` (connectivity), its ``delay`` (uplink) and a wrapper around the task
(downlink, compute speed, energy, attacks). Time is simulated: ``time_scale``
simulated seconds pass per real second, and only the scaled waits are slept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..profiles import MarkovConnectivity, Reading, SimProfile, SimReader
from ..tasks.training import accepts_should_stop

__all__ = ["SimReader"]
from ..codecs import encode_params
from ..device import UpdateEncoder
from ..outbox import Outbox
from ..tasks import DeviceData, TrainResult
from ..wire import QTensor, TrainConfig

log = logging.getLogger(__name__)

#: Largest real sleep taken in one go, so that a stop is noticed quickly.
SLEEP_SLICE_S = 0.05
#: One training at a time per worker process when no loop runs them: the worker
#: has one core, and trainings side by side only fight over the GIL.
TRAINING = threading.Lock()

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], T]


class LoopRunner:
    """Runs the trainings of a worker's devices on the worker's event-loop thread.

    Each agent trains in a thread of its own; the thread hands the work here and
    waits. Only the loop thread then runs Python: no GIL handed back and forth
    between the trainings and the loop that carries every device's MQTT traffic
    (each handover costs the loop up to a switch interval). The loop is blocked
    for one training at a time, which on one core is all it could run anyway.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def __call__(self, fn: Callable[[], T], stop: Callable[[], bool] = lambda: False) -> T:
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the waiting thread
                done.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop closed: the worker is stopping
            raise TrainingCancelled("the worker is stopping") from None
        while True:
            try:
                return done.result(timeout=SLEEP_SLICE_S)
            except concurrent.futures.TimeoutError:
                if stop() and done.cancel():
                    raise TrainingCancelled("stopped before it started") from None


class TrainingCancelled(RuntimeError):
    """A queued training that a stopping device no longer needs."""


def run_inline(fn: Callable[[], T], stop: Callable[[], bool] = lambda: False) -> T:
    with TRAINING:
        return fn()


class SimClock:
    """Simulated seconds since ``origin`` (a wall-clock time shared by every process)."""

    def __init__(self, origin: float, time_scale: float) -> None:
        self.origin = origin
        self.time_scale = time_scale

    def __call__(self) -> float:
        return max(0.0, (time.time() - self.origin) * self.time_scale)

    def real(self, simulated_s: float) -> float:
        """Real seconds that ``simulated_s`` simulated seconds take."""
        return simulated_s / self.time_scale


class ScaledReader:
    """A SimReader whose uplink is stated per real second.

    Deadlines that travel in Models are real (wall-clock) seconds, so the
    uplink that the eligibility policy weighs against them must be too.
    """

    def __init__(self, reader: SimReader, time_scale: float) -> None:
        self.inner = reader
        self.time_scale = time_scale

    def online(self) -> bool:
        return self.inner.online()

    def read(self) -> Reading:
        reading = self.inner.read()
        if reading.uplink_kbps is not None:
            reading.uplink_kbps *= self.time_scale
        return reading


@dataclass
class DeviceTally:
    """What one simulated device did, beyond what it publishes as metrics."""

    id: str
    gateway: str
    cohort: str
    updates: int = 0
    buffered: int = 0  # stored while offline, or whose first publish failed
    late: int = 0  # buffered ones delivered after a reconnect
    bytes_up: int = 0
    bytes_down: int = 0
    sim_train_s: float = 0.0
    energy_wh: float = 0.0
    battery: float | None = None
    pending: int = 0
    dropped: int = 0
    _late_ids: set[int] = field(default_factory=set, repr=False)


def attack_delta(delta: dict[str, np.ndarray], attack: str, scale: float) -> dict[str, np.ndarray]:
    """What an adversarial device trains into its delta (``nan`` is applied at encoding)."""
    if attack == "scale":
        return {k: (v * np.float32(scale)).astype(np.float32) for k, v in delta.items()}
    if attack == "sign_flip":
        return {k: (-v * np.float32(scale)).astype(np.float32) for k, v in delta.items()}
    return delta


class NaNEncoder(UpdateEncoder):
    """An update encoder that sends float32 NaNs whatever was trained.

    The agent refuses to send a non-finite delta, as an honest device should;
    a poisoning device skips that check, so the attack sits after it.
    """

    def tensors(self, delta: dict[str, np.ndarray], round_: int) -> list[QTensor]:
        return encode_params(
            {k: np.full(v.shape, np.nan, np.float32) for k, v in delta.items()}, "f32"
        )


class SimulatedTask:
    """The shared task as one simulated device runs it.

    ``train`` waits out the model's download over the device's downlink and the
    extra time a slower device would compute, drains its battery for the
    simulated training seconds, and applies the cohort's attack to the delta.
    Everything else is the shared task's.
    """

    def __init__(
        self,
        task: Any,
        profile: SimProfile,
        clock: SimClock,
        tally: DeviceTally,
        *,
        model_bytes: int,
        attack: str = "none",
        attack_scale: float = 1.0,
        runner: Callable[..., Any] = run_inline,
    ) -> None:
        self.inner = task
        self.name = task.name
        self.profile = profile
        self.clock = clock
        self.tally = tally
        self.model_bytes = model_bytes
        self.attack = attack
        self.attack_scale = attack_scale
        self.runner = runner
        self._inner_stoppable = accepts_should_stop(task.train)

    def init_params(self, seed: int = 0) -> Any:
        return self.inner.init_params(seed)

    def spec(self) -> Any:
        return self.inner.spec()

    def device_data(self, shard: int, num_shards: int) -> DeviceData:
        return self.inner.device_data(shard, num_shards)

    def evaluate(self, params: Any, data: DeviceData | None = None) -> Any:
        return self.inner.evaluate(params, data)

    def train(
        self,
        params: Any,
        data: DeviceData,
        cfg: TrainConfig,
        *,
        should_stop: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> TrainResult:
        stop = should_stop or (lambda: False)
        if self._inner_stoppable and should_stop is not None:
            kwargs["should_stop"] = should_stop
        timing: list[float] = []

        def work() -> TrainResult:
            # A new thread's OpenMP starts with one thread per core (torch's
            # limit is per thread): keep it to ours.
            torch.set_num_threads(1)
            started = time.perf_counter()
            out = self.inner.train(params, data, cfg, **kwargs)
            timing.append(time.perf_counter() - started)
            return out

        result = self.runner(work, stop)
        real_train_s = timing[0]
        _warn_if_host_too_slow(real_train_s, self.clock.time_scale, cfg.deadline_s)
        sim_train_s = real_train_s / self.profile.speed
        download_s = self.profile.link.download_delay_s(self.model_bytes)
        self.tally.sim_train_s += sim_train_s
        if self.profile.battery is not None:
            self.profile.battery.spend_training(sim_train_s)
        # Only what the simulated device would take beyond our real compute is slept.
        sleep_real(self.clock.real(download_s + sim_train_s) - real_train_s, stop)
        if self.attack in ("scale", "sign_flip"):
            result.delta = attack_delta(result.delta, self.attack, self.attack_scale)
        result.metrics["sim_train_s"] = sim_train_s
        return result


#: A real training longer than this share of the round deadline leaves too little
#: of the round for the rest: the host is too slow for the scenario's clock.
SLOW_HOST_SHARE = 0.5
_slow_host_told = threading.Event()


def _warn_if_host_too_slow(real_s: float, time_scale: float, deadline_s: float) -> None:
    """Say once per process when the host's compute takes a device past half its round.

    The nodes' deadlines are real seconds here (simulated ones over ``time_scale``),
    and no clock compresses real compute: such devices miss rounds for want of CPU,
    not by the scenario's design.
    """
    if real_s <= SLOW_HOST_SHARE * deadline_s or _slow_host_told.is_set():
        return
    _slow_host_told.set()
    log.warning(
        "this machine is too slow for time_scale %g: one training took %.2f s, over half the "
        "round's deadline of %.2f s (%.0f simulated seconds); devices will miss rounds "
        "(a lower --time-scale gives them time)",
        time_scale,
        real_s,
        deadline_s,
        deadline_s * time_scale,
    )


def warm_up(task: Any, seed: int, shard: int, num_shards: int) -> None:
    """Train once, briefly: the first training imports and initialises what torch
    loads lazily (seconds), which would otherwise land in the first round."""
    params = task.init_params(seed)
    task.train(params, task.device_data(shard, num_shards), TrainConfig(epochs=1), seed=seed)


def sleep_real(seconds: float, stop: Callable[[], bool]) -> None:
    """Block for ``seconds`` (in a training thread), in slices so that a stop is quick."""
    end = time.monotonic() + seconds
    while not stop():
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, SLEEP_SLICE_S))


class UplinkDelay:
    """The agent's ``delay``: an upload's simulated time on this device's uplink, scaled."""

    def __init__(self, profile: SimProfile, clock: SimClock) -> None:
        self.profile = profile
        self.clock = clock

    def __call__(self, nbytes: int) -> float:
        if self.profile.battery is not None:
            self.profile.battery.spend_upload(nbytes)
        return self.clock.real(self.profile.link.upload_delay_s(nbytes))


class CountingOutbox(Outbox):
    """The agent's outbox, counting updates buffered offline and delivered late.

    An update is buffered when it is stored while the device is offline or its
    first publish fails; it is late when such an update is acknowledged later.
    """

    def __init__(
        self,
        path: Path,
        tally: DeviceTally,
        connected: Callable[[], bool],
        **options: Any,
    ) -> None:
        super().__init__(path, **options)
        self._tally = tally
        self._connected = connected
        self._sizes: dict[int, int] = {}

    def put_with_seq(
        self, sender: str, topic: str, build: Callable[[int], bytes]
    ) -> tuple[int, int]:
        size = 0

        def measured(seq: int) -> bytes:
            nonlocal size
            payload = build(seq)
            size = len(payload)
            return payload

        entry_id, seq = super().put_with_seq(sender, topic, measured)
        self._tally.updates += 1
        self._sizes[entry_id] = size
        if not self._connected():
            self._buffer(entry_id)
        return entry_id, seq

    def mark_attempt(self, entry_id: int) -> None:
        self._buffer(entry_id)
        super().mark_attempt(entry_id)

    def mark_delivered(self, entry_id: int) -> None:
        """The agent's PUBACK (the entry then waits for its receipt): counted once."""
        super().mark_delivered(entry_id)
        self._delivered(entry_id)

    def ack(self, entry_id: int) -> None:
        super().ack(entry_id)
        self._delivered(entry_id)

    def _delivered(self, entry_id: int) -> None:
        self._tally.bytes_up += self._sizes.pop(entry_id, 0)
        if entry_id in self._tally._late_ids:
            self._tally._late_ids.discard(entry_id)
            self._tally.late += 1

    def _buffer(self, entry_id: int) -> None:
        if entry_id not in self._tally._late_ids and entry_id in self._sizes:
            self._tally._late_ids.add(entry_id)
            self._tally.buffered += 1


def finish_tally(tally: DeviceTally, profile: SimProfile, outbox: Any) -> DeviceTally:
    """Fill in the end-of-run fields: energy, battery, what is still waiting."""
    if profile.battery is not None:
        tally.energy_wh = profile.battery.energy_used_wh
        tally.battery = profile.battery.level
    if outbox is not None:
        tally.pending = len(outbox)
        tally.dropped = int(outbox.dropped)
    tally._late_ids = set()
    return tally


def always_online(profile: SimProfile) -> bool:
    """Whether a device never drops, so that nobody needs to poll its connectivity."""
    conn = profile.connectivity
    if conn is None:
        return True
    return isinstance(conn, MarkovConnectivity) and conn.p_drop == 0 and conn.start_online
