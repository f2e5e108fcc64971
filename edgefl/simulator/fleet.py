"""Run one scenario: the broker, the cloud and gateways here, the devices in worker processes.

The owner of every process and task of a simulation: whatever it started, it
stops, on success, on error and on Ctrl-C. Progress comes from the metrics
topics, like any other monitor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..broker import BrokerError, RunningBroker, start_broker
from ..config import AggregatorSettings, ConfigError, MqttSettings
from ..errors import EdgeflError
from ..topics import Topics
from ..transport import Transport
from ..wire import Model, Rejected, decode_metrics, encode_model, model_tensors
from . import SimulationError
from .devices import warm_up
from .history import History, summarize
from .progress import ProgressView
from .report import plot_history, print_summary, write_history, write_summary
from .scenario import Scenario, describe
from .workers import (
    WorkerPool,
    WorkerSpec,
    default_workers,
    split_plans,
    start_method,
    stop_tasks,
)

log = logging.getLogger(__name__)

#: How often the parent looks at its workers and its deadline.
TICK_S = 0.2
#: How long device workers may take to start and connect their devices.
WORKERS_READY_S = 120.0
#: After the cloud's last round, how long to wait for its metrics to reach the monitor.
LAST_METRICS_S = 3.0


@dataclass
class SimResult:
    """A finished (or stopped) simulation: its rows, its summary and where they were written."""

    scenario: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    out: Path
    files: list[Path] = field(default_factory=list)
    stopped: str = "done"
    pids: list[int] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return self.stopped == "interrupted"


@dataclass
class _Run:
    scenario: Scenario
    broker: str
    state_dir: Path
    history: History
    pool: WorkerPool
    progress: ProgressView
    task: Any
    stopped: str = "done"


def run_simulation(
    scenario: Scenario,
    *,
    broker: str = "mosquitto",
    out: Path,
    plain: bool = True,
    log_level: str = "WARNING",
    quiet: bool = False,
) -> SimResult:
    """Run ``scenario`` to its last cloud round (or timeout, target, Ctrl-C) and report.

    ``broker``: ``mosquitto`` (falling back to the embedded broker), ``embedded``,
    or the ``HOST:PORT`` of a running broker. Raises ``SimulationError``, or
    ``ConfigError`` when the task cannot serve the scenario's fleet.
    """
    started = time.time()
    plans = scenario.devices()
    if broker not in ("mosquitto", "embedded"):
        _check_reachable(broker)  # before seconds of loading
    task = _load_task(scenario, plans)
    with _broker(broker) as (url, broker_kind), _state_dir() as state_dir:
        workers = scenario.workers or default_workers()
        specs = [
            WorkerSpec(
                index=i,
                scenario=scenario.model_dump(mode="json"),
                plans=chunk,
                broker=url,
                state_dir=str(state_dir / "devices"),
                origin=started,
                parent_pid=os.getpid(),
                log_level=log_level,
            )
            for i, chunk in enumerate(split_plans(plans, workers))
        ]
        pool = WorkerPool(specs)
        history = History(devices=len(plans), gateways=scenario.fleet.gateways, started=started)
        title = f"{describe(scenario)}; {len(specs)} workers, broker {broker_kind} {url}"
        progress = ProgressView(scenario.rounds, plain=plain, title=title, quiet=quiet)
        run = _Run(scenario, url, state_dir, history, pool, progress, task)
        try:
            pool.start()
            with progress:
                asyncio.run(_orchestrate(run))
        except KeyboardInterrupt:
            run.stopped = "interrupted"
        finally:
            with _no_interrupts():
                pool.stop()
                if broker_kind == "external":  # a broker of its own goes with its messages
                    _clear_leftovers(url, ["cloud", *scenario.gateway_ids()])
        pids = pool.pids
    wall_s = time.time() - started
    if pool.errors and run.stopped != "interrupted":
        raise SimulationError("; ".join(pool.errors))
    summary = summarize(
        history.rows,
        pool.tallies,
        float32_update_bytes=history.float32_update_bytes,
        scenario=scenario.name,
        devices=len(plans),
        gateways=scenario.fleet.gateways,
        workers=len(specs),
        broker=broker_kind,
        seed=scenario.seed,
        rounds_planned=scenario.rounds,
        stopped=run.stopped,
        wall_s=round(wall_s, 3),
        model_bytes=history.model_bytes,
        declined=history.declined,
    )
    files = write_history(history.rows, out)
    files.append(write_summary(summary, out))
    files.extend(plot_history(history.rows, out, title=scenario.name))
    if not quiet:
        print_summary(summary, plain=plain)
        print(f"report: {out}", flush=True)
    return SimResult(scenario.name, history.rows, summary, out, files, run.stopped, pids)


# ---------------------------------------------------------------- resources


def _load_task(scenario: Scenario, plans: list[Any]) -> Any:
    """The task, loaded (and warmed up) before the workers fork: they inherit it all."""
    from ..tasks import load_task, set_torch_threads

    set_torch_threads(1)
    first = plans[0]
    try:
        task = load_task(scenario.task.name, **scenario.task.task_options(scenario.seed))
        task.device_data(first.shard, first.num_shards)  # can the data be split so?
    except (ValueError, TypeError) as exc:
        message = f"task {scenario.task.name!r} for {len(plans)} devices: {exc}"
        raise ConfigError(message.splitlines()[0]) from None
    if start_method() == "fork":
        warm_up(task, scenario.seed, first.shard, first.num_shards)
    return task


@contextlib.contextmanager
def _broker(choice: str) -> Iterator[tuple[str, str]]:
    if choice not in ("mosquitto", "embedded"):
        yield choice, "external"
        return
    try:
        running: RunningBroker = start_broker(choice)
    except BrokerError as exc:
        raise SimulationError(str(exc)) from None
    try:
        yield running.url, running.kind
    finally:
        with _no_interrupts():
            running.stop()


def _clear_leftovers(url: str, nodes: list[str]) -> None:
    """The run's retained statuses, models and announcements: a later fleet would read them."""
    from .leftovers import clear_retained

    try:
        asyncio.run(clear_retained(url, nodes, client_id=f"edgefl-sim-{os.getpid()}"))
    except (OSError, EdgeflError) as exc:
        log.warning("retained messages of the run left on %s: %s", url, exc)


def _check_reachable(url: str) -> None:
    host, _, port = url.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3.0):
            return
    except OSError as exc:
        raise SimulationError(f"cannot reach the broker at {url}: {exc}") from None


@contextlib.contextmanager
def _state_dir() -> Iterator[Path]:
    """Outboxes and checkpoints of simulated nodes: in memory where the OS offers it.

    A thousand devices each fsyncing an sqlite file per round would measure the
    disk, not the fleet; the simulator never restarts them from disk anyway.
    """
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="edgefl-sim-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """A second Ctrl-C must not cut the clean-up short and leave processes behind."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to hold off
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------ orchestration


async def _orchestrate(run: _Run) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, main.cancel)
    try:
        await _serve(run)
    except asyncio.CancelledError:
        run.stopped = "interrupted"
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


async def _serve(run: _Run) -> None:
    from ..aggregator import Aggregator

    s, task = run.scenario, run.task
    nodes = _node_settings(run)
    params = task.init_params(s.seed)
    run.history.model_bytes = _model_bytes(params, nodes[1])
    run.history.float32_update_bytes = 4 * sum(int(a.size) for a in params.values())
    cloud_done = asyncio.Event()
    target_hit = asyncio.Event()

    async def serve_node(settings: AggregatorSettings) -> None:
        async with Aggregator(settings, task) as node:
            await node.run()
        if settings.role == "cloud":
            cloud_done.set()

    monitor = Transport(
        MqttSettings(broker=run.broker, keepalive_s=60), f"edgefl-sim-monitor-{os.getpid()}"
    )
    await monitor.subscribe(Topics().all_metrics(), qos=0)
    tasks: list[asyncio.Future[None]] = []
    async with monitor:
        await monitor.wait_connected(30.0)
        tasks.append(asyncio.ensure_future(_watch_metrics(run, monitor, target_hit)))
        try:
            await _until_workers_ready(run)
            tasks.extend(asyncio.ensure_future(serve_node(n)) for n in nodes)
            run.stopped = await _until_finished(run, tasks, cloud_done, target_hit)
            if run.stopped == "done":
                await _await_rows(run, LAST_METRICS_S)
        finally:
            await stop_tasks(tasks)


def _node_settings(run: _Run) -> list[AggregatorSettings]:
    """The cloud, then every gateway, with deadlines turned from simulated to real seconds."""
    s = run.scenario
    state = run.state_dir / "nodes"
    task_fields = {"task": s.task.name, "task_options": s.task.task_options(s.seed)}

    def real_train(section: dict[str, Any]) -> dict[str, Any]:
        train = dict(section.get("train", {}))
        train["deadline_s"] = float(train.get("deadline_s", 30.0)) / s.time_scale
        return {"train": train, **task_fields}

    nodes = [s.cloud_settings(broker=run.broker, state_dir=state, **real_train(s.cloud))]
    children: dict[str, list[str]] = {g: [] for g in s.gateway_ids()}
    for plan in s.devices():
        children[plan.gateway].append(plan.id)
    for index, gid in enumerate(s.gateway_ids()):
        nodes.append(
            s.gateway_settings(
                index,
                children[gid],
                broker=run.broker,
                state_dir=state,
                **real_train(s.gateway),
            )
        )
    return nodes


def _model_bytes(params: Any, settings: AggregatorSettings) -> int:
    model = Model(
        sender=settings.id, version=0, tensors=model_tensors(params, settings.downlink_dtype)
    )
    return len(encode_model(model))


async def _watch_metrics(run: _Run, monitor: Transport, target_hit: asyncio.Event) -> None:
    target = run.scenario.target_accuracy
    async for message in monitor.messages():
        try:
            doc = decode_metrics(message.payload)
        except Rejected:
            continue
        row = run.history.feed(doc)
        if row is None:
            continue
        run.progress.update(row)
        acc = row.get("accuracy")
        if target is not None and acc is not None and acc >= target:
            target_hit.set()


async def _until_workers_ready(run: _Run) -> None:
    """Aggregators start once every device is up: round 1 then sees the whole fleet."""
    deadline = time.monotonic() + WORKERS_READY_S
    while not run.pool.all_ready:
        run.pool.poll()
        if run.pool.errors:
            raise SimulationError("; ".join(run.pool.errors))
        if time.monotonic() >= deadline:
            raise SimulationError(f"device workers not ready after {WORKERS_READY_S:.0f} s")
        await asyncio.sleep(0.05)
    pool = run.pool
    run.progress.note(f"{pool.devices_connected} of {pool.devices_ready} devices connected")


async def _until_finished(
    run: _Run,
    tasks: list[asyncio.Future[None]],
    cloud_done: asyncio.Event,
    target_hit: asyncio.Event,
) -> str:
    """Why the run ended: done, target, timeout; raises on a failed node or worker."""
    deadline = time.monotonic() + run.scenario.timeout_s
    while True:
        run.pool.poll()
        if run.pool.errors:
            raise SimulationError("; ".join(run.pool.errors))
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise SimulationError(f"an aggregator failed: {t.exception()}")
        if cloud_done.is_set():
            return "done"
        if target_hit.is_set():
            return "target"
        if time.monotonic() >= deadline:
            log.warning("timeout after %.0f s; stopping", run.scenario.timeout_s)
            return "timeout"
        await asyncio.sleep(TICK_S)


async def _await_rows(run: _Run, timeout_s: float) -> None:
    """The cloud's last metrics travel like any other: give them a moment to arrive."""
    end = time.monotonic() + timeout_s
    while len(run.history.rows) < run.scenario.rounds and time.monotonic() < end:
        await asyncio.sleep(0.05)
