"""The device agent against a real Mosquitto, with a test harness in the gateway's place.

In process where the agent's internals are watched, as a subprocess (``python -m
edgefl.cli device``) where it is killed or signalled. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from aggregator_fakes import publish_round
from fake_broker import FakeBroker
from readme_tables import table_names
from timeouts import within

from edgefl import codecs, wire
from edgefl.broker import RunningBroker, start_mosquitto
from edgefl.config import DeviceSettings, MqttSettings
from edgefl.device import DeviceAgent
from edgefl.outbox import Outbox
from edgefl.params import Params, add
from edgefl.profiles import Reading
from edgefl.tasks import Task, load_task, set_torch_threads
from edgefl.tasks.training import TrainingStopped
from edgefl.topics import Topics
from edgefl.transport import Transport

pytestmark = pytest.mark.integration

GW = "gw-t"
DEV = "dev-1"
SHARDS = 4
TOPICS = Topics()
KEY = "00112233445566778899aabbccddeeff"


@pytest.fixture(scope="module")
def task() -> Task:
    set_torch_threads(1)  # as the agent's process does; two cores are shared by everything
    return load_task("digits", model="mlp")


# ------------------------------------------------------------------ harness


@dataclass
class Gateway:
    """Stands where a gateway would: publishes models, collects updates, statuses, metrics."""

    url: str
    updates: list[wire.Update] = field(default_factory=list)
    raw_updates: list[bytes] = field(default_factory=list)
    statuses: list[wire.Status] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        settings = MqttSettings(broker=self.url, reconnect_min_s=0.1, reconnect_max_s=0.5)
        transport = Transport(settings, "gateway-harness")
        for topic in (TOPICS.updates_of(GW), TOPICS.statuses_of(GW), TOPICS.all_metrics()):
            await transport.subscribe(topic)
        async with transport:
            self.transport = transport
            collector = asyncio.create_task(self._collect())
            try:
                await transport.wait_connected(10)
                yield self
            finally:
                collector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collector

    async def _collect(self) -> None:
        async for msg in self.transport.messages():
            kind = TOPICS.parse(msg.topic).kind
            if kind == "update":
                self.raw_updates.append(msg.payload)
                self.updates.append(wire.decode_update(msg.payload))
            elif kind == "status" and msg.payload:
                self.statuses.append(wire.decode_status(msg.payload))
            elif kind == "metrics":
                self.metrics.append(wire.decode_metrics(msg.payload))

    async def until(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with within(timeout):
            while not predicate():
                await asyncio.sleep(0.05)

    async def publish_model(
        self, params: Params, *, version: int, round_: int, deadline_in: float = 60.0, **config: Any
    ) -> wire.Announcement:
        return await publish_round(
            self.transport,
            TOPICS,
            GW,
            params,
            version=version,
            round=round_,
            config=wire.TrainConfig(**{"epochs": 2, "lr": 0.1, **config}),
            deadline=time.time() + deadline_in,
        )

    def status_of(self, dev: str = DEV) -> wire.Status | None:
        return next((s for s in reversed(self.statuses) if s.id == dev), None)

    def rounds(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m.get("event") == "round"]


def device_settings(url: str, state_dir: Path, **extra: Any) -> DeviceSettings:
    return DeviceSettings(
        id=DEV,
        gateway=GW,
        mqtt={"broker": url, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        state_dir=state_dir,
        num_shards=SHARDS,
        heartbeat_s=0.5,
        **extra,
    )


@contextlib.asynccontextmanager
async def serving(agent: DeviceAgent) -> AsyncIterator[DeviceAgent]:
    async with agent:
        runner = asyncio.create_task(agent.run())
        try:
            yield agent
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


@contextlib.contextmanager
def device_process(url: str, state_dir: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [
        sys.executable,
        "-m",
        "edgefl.cli",
        "device",
        "--id",
        DEV,
        "--gateway",
        GW,
        "--broker",
        url,
        "--state-dir",
        str(state_dir),
        "--num-shards",
        str(SHARDS),
        "--heartbeat-s",
        "1",
        "--mqtt-reconnect-min-s",
        "0.1",
        "--mqtt-reconnect-max-s",
        "0.5",
        # The tests below need rounds that run for minutes, past a board's default bounds.
        "--max-epochs",
        "1000",
        "--min-batch-size",
        "1",
    ]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def undocumented(record: dict[str, Any]) -> set[str]:
    """Fields of a metrics record missing from the README's device metrics table."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = re.split(r"\n#{2,4} ", text.split("#### Device metrics", 1)[1], maxsplit=1)[0]
    names = table_names(section)
    known = [
        re.compile(re.escape(n).replace(re.escape("<reason>"), "[a-z_]+") + "$") for n in names
    ]
    envelope = {"schema", "role", "id", "ts", "event"}  # the every-role table
    return {k for k in record if k not in envelope and not any(p.match(k) for p in known)}


def loss_on(task: Task, params: Params, shard: int = 0) -> float:
    result = task.evaluate(params, task.device_data(shard, SHARDS))
    assert result is not None
    return result["loss"]


# -------------------------------------------------------------------- tests


async def test_agent_trains_its_shard_and_the_update_lowers_the_loss(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    params = task.init_params(0)
    settings = device_settings(broker.url, tmp_path, hmac_key=KEY)
    agent = DeviceAgent(settings, task)
    async with Gateway(broker.url).running() as gw, serving(agent):
        await gw.publish_model(params, version=3, round_=1, epochs=3)
        await gw.until(lambda: bool(gw.updates) and bool(gw.rounds()), 30)
        await asyncio.sleep(0.5)  # room for a duplicate to show up
        # Nagle off: back-to-back QoS 1 publishes would wait on delayed TCP ACKs.
        sock = agent.transport._client._client.socket()  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1

    (update,) = gw.updates
    n = len(task.device_data(0, SHARDS))
    assert (update.sender, update.seq, update.round, update.base, update.n) == (DEV, 0, 1, 3, n)
    wire.verify(update, bytes.fromhex(KEY))
    trained = add(params, codecs.decode_params(update.tensors))
    before, after = loss_on(task, params), loss_on(task, trained)
    assert after < before - 0.05, (before, after)
    # loss_before is estimated on up to 256 samples of the shard: close, not exact.
    assert update.metrics["loss_before"] == pytest.approx(before, rel=0.05)

    (record,) = gw.rounds()
    assert record["upload_bytes"] == len(gw.raw_updates[0])
    assert record["compression"] == pytest.approx(
        4 * sum(a.size for a in params.values()) / len(gw.raw_updates[0])
    )
    assert record["compression"] > 3.5
    assert record["samples"] == n and record["seq"] == 0 and record["buffered"] == 0
    assert record["train_ms"] > 0 and record["quantize_ms"] >= 0 and record["encode_ms"] >= 0
    assert record["task_ms"] >= record["train_ms"] and record["uploaded"] == 1
    assert undocumented(record) == set()
    statuses = [s for s in gw.statuses if s.id == DEV]
    assert any(s.online and s.model_version == 3 and s.eligible for s in statuses)
    assert not statuses[-1].online  # the goodbye of a clean stop


@dataclass
class FakeReader:
    reading: Reading

    def read(self) -> Reading:
        return Reading(**vars(self.reading))


async def test_low_battery_declines_until_the_device_is_plugged_in(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    reader = FakeReader(Reading(battery=0.1, charging=False, link="wifi"))
    params = task.init_params(0)
    agent = DeviceAgent(device_settings(broker.url, tmp_path), task, reader=reader)
    async with Gateway(broker.url).running() as gw, serving(agent):
        await gw.publish_model(params, version=1, round_=1, deadline_in=2.0)
        await gw.until(lambda: getattr(gw.status_of(), "reason", "") == "battery_low", 10)
        status = gw.status_of()
        assert status is not None and not status.eligible and status.reason == "battery_low"
        await asyncio.sleep(2.5)  # past the deadline
        assert gw.updates == [] and agent.rounds_trained == 0
        assert agent.declined == {"battery_low": 1}

        # Still on battery when round 2 arrives, then plugged in before its deadline.
        await gw.publish_model(params, version=1, round_=2, deadline_in=30.0)
        await gw.until(lambda: agent.declined["battery_low"] == 2, 10)
        reader.reading.charging = True
        await gw.until(lambda: bool(gw.updates), 20)
        await gw.until(lambda: getattr(gw.status_of(), "eligible", False), 10)

    assert [u.round for u in gw.updates] == [2]
    declined = [m for m in gw.metrics if m.get("event") == "declined"]
    assert [(m["round"], m["reason"]) for m in declined] == [(1, "battery_low"), (2, "battery_low")]
    assert declined[-1]["declined_battery_low"] == 2 and undocumented(declined[-1]) == set()


async def test_update_trained_offline_survives_a_reboot_and_arrives_once(
    tmp_path: Path, task: Task
) -> None:
    broker = start_mosquitto()
    port = broker.port
    params = task.init_params(0)
    log = tmp_path / "device.log"
    try:
        async with Gateway(broker.url).running() as gw:
            with device_process(broker.url, tmp_path, log) as proc:
                await gw.until(lambda: gw.status_of() is not None, 60)
                await gw.publish_model(params, version=1, round_=1, epochs=100)
                await gw.until(lambda: getattr(gw.status_of(), "model_version", None) == 1, 20)
                broker.stop()  # the agent is training now: its update has nowhere to go
                await _until_buffered(tmp_path, 1, 60)
                proc.kill()
                proc.wait(10)
            assert gw.updates == []

            broker = start_mosquitto(port=port)
            await gw.transport.wait_connected(20)
            with device_process(broker.url, tmp_path, log) as proc:
                await gw.until(lambda: len(gw.updates) == 1, 60)
                # The retained model died with the broker; a republished round 1 is not retrained.
                await gw.publish_model(params, version=1, round_=1, epochs=1)
                await gw.publish_model(params, version=2, round_=2, epochs=1)
                await gw.until(lambda: len(gw.updates) >= 2, 30)
                await asyncio.sleep(1.0)  # room for a duplicate to show up
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(15) == 0
    finally:
        broker.stop()
    assert [(u.seq, u.round, u.base) for u in gw.updates] == [(0, 1, 1), (1, 2, 2)], log.read_text()


async def _until_buffered(state_dir: Path, count: int, timeout: float) -> None:
    async with within(timeout):
        while True:
            path = state_dir / f"device-{DEV}.db"
            if path.exists():
                with Outbox(path) as box:
                    if len(box) >= count:
                        return
            await asyncio.sleep(0.2)


class CuttingProxy:
    """TCP proxy that drops every connection once ``cut_after`` bytes went upstream and
    refuses connections for ``outage_s`` (as a broker restarting would), then forwards again."""

    def __init__(self, upstream_port: int, cut_after: int, outage_s: float = 1.0) -> None:
        self.upstream_port, self.cut_after, self.outage_s = upstream_port, cut_after, outage_s
        self.port = 0
        self.forwarded = 0
        self.cuts = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._reopen: asyncio.Future[None] | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, upstream=True),
            self._pipe(up_reader, writer, upstream=False),
            return_exceptions=True,
        )

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()
                if upstream:
                    self.forwarded += len(chunk)
                    if self.cuts == 0 and self.forwarded >= self.cut_after:
                        self._cut()
        finally:
            dst.close()

    def _cut(self) -> None:
        self.cuts += 1
        self.server.close()
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()
        self._reopen = asyncio.ensure_future(self._reopen_later())

    async def _reopen_later(self) -> None:
        await asyncio.sleep(self.outage_s)
        await self.start()

    async def close(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
            await asyncio.gather(self._reopen, return_exceptions=True)
        self.server.close()
        for w in self._writers:
            w.transport.abort()


async def test_connection_lost_mid_flush_loses_and_duplicates_nothing(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    entries, size = 24, 500_000
    proxy = CuttingProxy(broker.port, cut_after=size * 21 // 2)  # in the second window
    settings = device_settings(f"127.0.0.1:{await proxy.start()}", tmp_path)
    state = tmp_path / f"device-{DEV}.db"
    payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes()
    with Outbox(state) as box:
        for _ in range(entries):
            box.put_with_seq(DEV, TOPICS.update(GW, DEV), lambda seq: _update_bytes(seq, payload))
    agent = DeviceAgent(settings, task)
    try:
        async with Gateway(broker.url).running() as gw, serving(agent):
            await gw.until(lambda: len({u.seq for u in gw.updates}) == entries, 60)
            await gw.until(lambda: agent.outbox is not None and len(agent.outbox) == 0, 10)
            connects = agent.transport.connects if agent.transport else 0
    finally:
        await proxy.close()
    assert proxy.cuts == 1 and connects >= 2
    assert sorted({u.seq for u in gw.updates}) == list(range(entries))
    assert all(u.tensors[0].q == payload for u in gw.updates)
    # The new session re-sent what the first one delivered or had in flight (the broker
    # may have lost it, and no receipt came), each once; the node dedupes by seq.
    sent = [u.seq for u in gw.updates]
    assert all(sent.count(seq) <= 2 for seq in range(entries))


def _update_bytes(seq: int, payload: bytes) -> bytes:
    tensor = wire.QTensor(name="w", shape=[len(payload)], lo=0.0, scale=1.0, q=payload)
    update = wire.Update(sender=DEV, seq=seq, round=0, base=0, n=1, tensors=[tensor])
    return wire.encode_update(update)


class GatedTask:
    """A task whose training waits until the test opens ``gate`` (stoppable meanwhile)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def train(self, *args: Any, should_stop: Callable[[], bool], **kwargs: Any) -> Any:
        while not self.gate.wait(0.05):
            if should_stop():
                raise TrainingStopped("stopped at the gate")
        return self.task.train(*args, should_stop=should_stop, **kwargs)


async def test_offline_link_buffers_the_update_and_delivers_it_once_back_online(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    link = {"up": True}
    delays: list[int] = []

    def delay(nbytes: int) -> float:
        delays.append(nbytes)
        return 0.2

    data = task.device_data(2, SHARDS)
    gated = GatedTask(task)
    agent = DeviceAgent(
        device_settings(broker.url, tmp_path),
        gated,  # type: ignore[arg-type]
        data=data,
        online=lambda: link["up"],
        delay=delay,
    )
    params = task.init_params(0)
    async with Gateway(broker.url).running() as gw, serving(agent):
        await gw.publish_model(params, version=5, round_=1)
        await gw.until(lambda: getattr(gw.status_of(), "model_version", None) == 5, 20)
        link["up"] = False
        await gw.until(lambda: not agent.connected, 5)
        statuses = len(gw.statuses)
        gated.gate.set()  # training ends while the link is down
        await gw.until(lambda: agent.outbox is not None and len(agent.outbox) == 1, 30)
        await asyncio.sleep(0.5)
        assert gw.updates == [] and len(gw.statuses) == statuses  # silent while offline
        link["up"] = True
        await gw.until(lambda: bool(gw.updates), 20)
        await gw.until(lambda: len(agent.outbox or ()) == 0, 10)
        await asyncio.sleep(0.5)

    (update,) = gw.updates
    assert (update.seq, update.base, update.n) == (0, 5, len(data))
    assert delays == [len(gw.raw_updates[0])]
    assert agent.uplink.samples == 1 and agent.uplink.kbps is not None


async def test_sigterm_during_training_exits_fast_and_leaves_the_outbox_consistent(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    params = task.init_params(0)
    async with Gateway(broker.url).running() as gw:
        with device_process(broker.url, tmp_path, tmp_path / "device.log") as proc:
            await gw.until(lambda: gw.status_of() is not None, 60)
            await gw.publish_model(params, version=1, round_=1, epochs=1000, batch_size=1)
            await gw.until(lambda: getattr(gw.status_of(), "model_version", None) == 1, 20)
            await asyncio.sleep(1.0)  # well into a round that would take minutes
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 15)
            elapsed = time.monotonic() - start
        await gw.until(lambda: not getattr(gw.status_of(), "online", True), 5)
    assert rc == 0 and elapsed < 15, elapsed
    assert gw.updates == []
    db = sqlite3.connect(tmp_path / f"device-{DEV}.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    with Outbox(tmp_path / f"device-{DEV}.db") as box:
        assert len(box) == 0 and box.next_seq(DEV) == 0  # no entry, no seq spent


async def test_an_unacknowledged_update_stays_buffered_and_the_agent_keeps_running(
    tmp_path: Path, task: Task
) -> None:
    with Outbox(tmp_path / f"device-{DEV}.db") as box:
        box.put_with_seq(DEV, TOPICS.update(GW, DEV), lambda seq: _update_bytes(seq, b"\x01" * 64))
    async with FakeBroker(puback=False, greeting=b"").running() as mqtt:
        settings = device_settings(mqtt.broker, tmp_path)
        settings.mqtt.publish_timeout_s = 0.5
        agent = DeviceAgent(settings, task)
        async with serving(agent):
            async with within(10):
                while not agent.outbox or agent.outbox.peek(1)[0].attempts < 2:
                    await asyncio.sleep(0.1)
            assert len(agent.outbox) == 1


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU visible to torch: fp16 mixed precision needs one",
)
async def test_cuda_fp16_training_sends_an_update_that_lowers_the_loss(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    params = task.init_params(0)
    settings = device_settings(broker.url, tmp_path, compute="cuda", precision="fp16")
    async with Gateway(broker.url).running() as gw, serving(DeviceAgent(settings, task)):
        await gw.publish_model(params, version=1, round_=1, epochs=5)
        await gw.until(lambda: bool(gw.updates) and bool(gw.rounds()), 60)
    (record,) = gw.rounds()
    assert record["mixed_precision"] == 1.0 and record["peak_mem_mb"] > 0
    trained = add(params, codecs.decode_params(gw.updates[0].tensors))
    assert loss_on(task, trained) < loss_on(task, params) - 0.05
