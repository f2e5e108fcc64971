"""Device worker processes: each runs many DeviceAgents, one MQTT session per device.

The parent talks to a worker over a pipe: ``ready`` when its agents run, ``stop``
to end them, then ``done`` with every device's tally. A worker never outlives
its parent: a closed pipe or a new parent pid stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..supervise import wait_event
from .scenario import DevicePlan, Scenario

log = logging.getLogger(__name__)

#: How often a worker checks that its parent is still there, and samples its devices.
WATCH_S = 0.5
#: How long a worker waits for its devices' first connections before it reports ready.
CONNECT_TIMEOUT_S = 30.0
#: How long the parent waits for a worker to stop cleanly before terminating it.
STOP_TIMEOUT_S = 15.0
#: The event loop carries every device's MQTT traffic and gives up the GIL at each
#: syscall; with the default 5 ms, a training thread makes it wait that long each time.
SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, picklable: it rebuilds the rest itself."""

    index: int
    scenario: dict[str, Any]
    plans: list[DevicePlan]
    broker: str
    state_dir: str
    origin: float
    parent_pid: int
    log_level: str = "WARNING"


def split_plans(plans: list[DevicePlan], workers: int) -> list[list[DevicePlan]]:
    """Round-robin, so that every gateway's devices train on every core."""
    workers = max(1, min(workers, len(plans)))
    return [plans[i::workers] for i in range(workers)]


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def start_method() -> str:
    """``fork`` on Linux while this process has one thread: workers inherit torch, the
    task and its data, already loaded and shared copy-on-write. Otherwise ``spawn``
    (a fresh interpreter that loads them itself): forking a process with other
    threads may copy a lock one of them holds."""
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return "fork"
    return "spawn"


# ------------------------------------------------------------- in the worker


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process."""
    # Ctrl-C reaches the whole process group: the parent alone decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=getattr(logging, spec.log_level, logging.WARNING),
        format=f"%(asctime)s %(levelname)-7s w{spec.index} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from ..tasks import set_torch_threads

    set_torch_threads(1)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        asyncio.run(_serve(spec, conn))
    except Exception as exc:
        log.exception("worker %d failed", spec.index)
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", spec.index, f"{type(exc).__name__}: {exc}".splitlines()[0]))
    finally:
        conn.close()


async def _serve(spec: WorkerSpec, conn: Connection) -> None:
    from ..device import DeviceAgent
    from ..tasks import load_task
    from .devices import (
        CountingOutbox,
        DeviceTally,
        LoopRunner,
        NaNEncoder,
        ScaledReader,
        SimClock,
        SimReader,
        SimulatedTask,
        UplinkDelay,
        always_online,
        finish_tally,
        warm_up,
    )

    scenario = Scenario.model_validate(spec.scenario)
    task = load_task(scenario.task.name, **scenario.task.task_options(scenario.seed))
    clock = SimClock(spec.origin, scenario.time_scale)
    runner = LoopRunner(asyncio.get_running_loop())
    model_bytes = 4 * sum(int(a.size) for a in task.init_params(scenario.seed).values())
    state_dir = Path(spec.state_dir)
    tallies: list[tuple[Any, Any, DeviceTally]] = []
    async with contextlib.AsyncExitStack() as stack:
        for plan in spec.plans:
            cohort = scenario.profiles[plan.cohort]
            profile = scenario.profile(plan)
            tally = DeviceTally(plan.id, plan.gateway, cohort.name)
            settings = scenario.device_settings(plan, broker=spec.broker, state_dir=state_dir)
            reader = ScaledReader(SimReader(profile, clock), scenario.time_scale)
            made: list[DeviceAgent] = []  # the agent, once made: its outbox asks it
            agent = DeviceAgent(
                settings,
                SimulatedTask(
                    task,
                    profile,
                    clock,
                    tally,
                    model_bytes=model_bytes,
                    attack=cohort.attack,
                    attack_scale=cohort.attack_scale,
                    runner=runner,
                ),
                reader=reader,
                online=None if always_online(profile) else reader.online,
                delay=UplinkDelay(profile, clock),
                data=task.device_data(plan.shard, plan.num_shards),
                encoder=NaNEncoder(settings) if cohort.attack == "nan" else None,
                open_outbox=functools.partial(
                    CountingOutbox,
                    tally=tally,
                    connected=functools.partial(_connected, made),
                ),
            )
            made.append(agent)
            await stack.enter_async_context(agent)
            tallies.append((agent, profile, tally))
        if spec.plans:
            warm_up(task, scenario.seed, spec.plans[0].shard, spec.plans[0].num_shards)
        runs = [asyncio.ensure_future(agent.run()) for agent, _, _ in tallies]
        downloads = _DownloadMeter([(a, t) for a, _, t in tallies])
        connected = await _until_connected([a for a, _, _ in tallies], CONNECT_TIMEOUT_S)
        conn.send(("ready", spec.index, len(runs), connected))
        try:
            await _until_stopped(spec, conn, runs, downloads)
        finally:
            await stop_tasks(runs)
            downloads.sample()
        done = [asdict(finish_tally(t, p, a.outbox)) for a, p, t in tallies]
    with contextlib.suppress(OSError, ValueError):
        conn.send(("done", spec.index, done))


def _connected(agents: list[Any]) -> bool:
    """Whether the agent (once made) has its MQTT session."""
    return bool(agents) and bool(agents[0].connected)


async def _until_connected(agents: list[Any], timeout_s: float) -> int:
    """Wait until every device that is online has its session, so that round 1 sees them all."""
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = [a for a in agents if not a.connected and _online(a)]
        if not waiting or time.monotonic() >= deadline:
            return sum(1 for a in agents if a.connected)
        await asyncio.sleep(0.05)


def _online(agent: Any) -> bool:
    online = getattr(agent, "_online", None)
    return online is None or bool(online())


class _DownloadMeter:
    """Bytes each device received: its sessions' transports, sampled (one per session)."""

    def __init__(self, agents: list[tuple[Any, Any]]) -> None:
        self.agents = agents
        self._seen: dict[int, tuple[Any, int]] = {}

    def sample(self) -> None:
        for i, (agent, tally) in enumerate(self.agents):
            transport = agent.transport
            if transport is None:
                continue
            last = self._seen.get(i)
            base = last[1] if last is not None and last[0] is transport else 0
            tally.bytes_down += transport.bytes_in - base
            self._seen[i] = (transport, transport.bytes_in)


async def _until_stopped(
    spec: WorkerSpec, conn: Connection, runs: list[asyncio.Future[None]], meter: _DownloadMeter
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_readable() -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            message = "stop"
        if message == "stop":
            stop.set()

    loop.add_reader(conn.fileno(), on_readable)
    try:
        while not stop.is_set():
            if os.getppid() != spec.parent_pid:
                log.warning("worker %d: parent gone; stopping", spec.index)
                return
            failed = [r for r in runs if r.done()]
            if failed:
                failed[0].result()  # a device agent that stops on its own is a bug: surface it
                raise RuntimeError("a device agent stopped on its own")
            meter.sample()
            await wait_event(stop, WATCH_S)
    finally:
        loop.remove_reader(conn.fileno())


async def stop_tasks(tasks: list[asyncio.Future[Any]], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again those still running.

    On Python < 3.12 ``asyncio.wait_for`` can swallow a cancellation that lands
    as its inner wait completes; a loop around it then never ends. A second
    cancel reaches it at its next wait.
    """
    pending = {t for t in tasks if not t.done()}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    if pending:
        log.warning("%d tasks did not stop in %.0f s", len(pending), timeout_s)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: what failed was reported where it happened


# ------------------------------------------------------------- in the parent


class WorkerPool:
    """The worker processes of one simulation, owned by the parent.

    ``start`` spawns them (fresh interpreters: no inherited threads or event
    loop), ``stop`` asks each to stop, collects the tallies, and terminates
    any that do not end in time. Workers are daemons, so they end with us.
    """

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.specs = specs
        self._ctx: Any = multiprocessing.get_context(start_method())
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self.tallies: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.ready: set[int] = set()
        self.devices_ready = 0
        self.devices_connected = 0
        self._done: set[int] = set()

    def start(self) -> None:
        for spec in self.specs:
            parent_end, child_end = self._ctx.Pipe()
            proc = self._ctx.Process(
                target=worker_main, args=(spec, child_end), name=f"edgefl-sim-{spec.index}"
            )
            proc.daemon = True
            proc.start()
            child_end.close()
            self.processes.append(proc)
            self.conns.append(parent_end)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def poll(self) -> None:
        """Read whatever the workers said; never blocks."""
        for conn in self.conns:
            with contextlib.suppress(EOFError, OSError):
                while not conn.closed and conn.poll():
                    self._handle(conn.recv())
        for proc, spec in zip(self.processes, self.specs, strict=True):
            if proc.exitcode not in (None, 0) and spec.index not in self._done:
                self._done.add(spec.index)
                self.errors.append(f"worker {spec.index} exited with code {proc.exitcode}")

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind, index = message[0], message[1]
        if kind == "ready":
            self.ready.add(index)
            self.devices_ready += int(message[2])
            self.devices_connected += int(message[3])
        elif kind == "error":
            self.errors.append(f"worker {index}: {message[2]}")
            self._done.add(index)
        elif kind == "done":
            self.tallies.extend(message[2])
            self._done.add(index)

    @property
    def all_ready(self) -> bool:
        return len(self.ready) == len(self.specs)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every worker: ask, wait for its tallies, then terminate and kill if needed."""
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError, BrokenPipeError):
                conn.send("stop")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.is_alive() for p in self.processes):
            self.poll()
            time.sleep(0.05)
        self.poll()
        for proc in self.processes:
            if proc.is_alive():
                log.warning("worker %s did not stop in %.0fs; terminating", proc.name, timeout_s)
                proc.terminate()
                proc.join(3.0)
            if proc.is_alive():
                proc.kill()
            proc.join(3.0)
        for conn in self.conns:
            conn.close()
