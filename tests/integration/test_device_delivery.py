"""End-to-end delivery from a device against a real Mosquitto: a PUBACK is not a receipt.

A gateway stand-in subscribes (or not), publishes models with or without receipts,
and the broker restarts; the device's outbox is watched. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgefl import delivery, wire
from edgefl.broker import RunningBroker, start_mosquitto
from edgefl.config import DeviceSettings, MqttSettings
from edgefl.device import DeviceAgent, agent
from edgefl.params import Params, spec_of
from edgefl.tasks import DeviceData, TrainResult
from edgefl.topics import Topics
from edgefl.transport import Transport

sys.path.insert(0, str(Path(__file__).parent))
from aggregator_fakes import publish_round
from test_device import serving

pytestmark = pytest.mark.integration

GW = "gw-d"
DEV = "dev-d"
TOPICS = Topics()


class StepTask:
    """Trains in no time: every round's delta is the same small step. ``size`` floats."""

    name = "step"

    def __init__(self, size: int = 64) -> None:
        self.size = size

    def init_params(self, seed: int = 0) -> Params:
        return {"w": np.zeros(self.size, np.float32)}

    def spec(self) -> dict[str, tuple[int, ...]]:
        return spec_of(self.init_params())

    def device_data(self, shard: int, num_shards: int) -> DeviceData:
        return DeviceData(torch.zeros(8, 1), torch.zeros(8, dtype=torch.long))

    def train(self, params: Params, data: DeviceData, cfg: Any, **_: Any) -> TrainResult:
        delta = {"w": np.linspace(-0.01, 0.01, self.size, dtype=np.float32)}
        metrics = {"loss": 1.0, "loss_before": 1.5, "train_ms": 1.0, "samples": 8.0}
        return TrainResult(delta=delta, n=8, metrics=metrics)

    def evaluate(self, params: Params, data: DeviceData | None = None) -> None:
        return None


class Node:
    """The gateway's side: publishes models (with receipts); listening, it collects updates."""

    def __init__(self, url: str, task: StepTask) -> None:
        self.url, self.task = url, task
        self.updates: list[wire.Update] = []

    @contextlib.asynccontextmanager
    async def running(self, *, listen: bool = True) -> AsyncIterator[Node]:
        mqtt = MqttSettings(broker=self.url, reconnect_min_s=0.1, reconnect_max_s=0.3)
        transport = Transport(mqtt, f"node-{listen}")
        if listen:
            await transport.subscribe(TOPICS.updates_of(GW))
        async with transport:
            self.transport = transport
            collector = asyncio.ensure_future(self._collect())
            try:
                await transport.wait_connected(10)
                yield self
            finally:
                collector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collector

    async def _collect(self) -> None:
        async for msg in self.transport.messages():
            if TOPICS.parse(msg.topic).kind == "update":
                self.updates.append(wire.decode_update(msg.payload))

    async def model(
        self,
        version: int,
        *,
        receipts: dict[str, tuple[int, int]] | None = None,
        deadline_s: float = 30.0,
    ) -> None:
        await self.transport.wait_connected(10)
        await publish_round(
            self.transport,
            TOPICS,
            GW,
            self.task.init_params(),
            version=version,
            round=version,
            config=wire.TrainConfig(deadline_s=deadline_s),
            deadline=time.time() + 60,
            receipts=receipts or {},
        )


def settings(url: str, state_dir: Path) -> DeviceSettings:
    return DeviceSettings(
        id=DEV,
        gateway=GW,
        mqtt={"broker": url, "reconnect_min_s": 0.1, "reconnect_max_s": 0.3},
        state_dir=state_dir,
        heartbeat_s=0.5,
    )


async def until(predicate: Callable[[], bool], timeout: float) -> None:
    """Bounded wait, on Python 3.10 as well (no ``asyncio.timeout`` there)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout} s")
        await asyncio.sleep(0.05)


@pytest.fixture
def quick_resends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Receipts late after 1 s, looked for every 0.1 s (5 s and 5 s in service)."""
    monkeypatch.setattr(delivery, "RESEND_MIN_S", 1.0)
    monkeypatch.setattr(agent, "RESEND_POLL_S", 0.1)


def _delivered(device: DeviceAgent, count: int) -> Callable[[], bool]:
    box = device.outbox
    return lambda: box is not None and len(box) == 0 and box.backlog().unreceipted == count


async def test_an_update_acknowledged_with_no_gateway_listening_is_sent_again_on_a_new_session(
    broker: RunningBroker, tmp_path: Path
) -> None:
    task, link = StepTask(), {"up": True}
    node = Node(broker.url, task)
    first = DeviceAgent(settings(broker.url, tmp_path), task)
    async with node.running(listen=False), serving(first):
        await node.model(1)
        await until(_delivered(first, 1), 20)  # the broker's PUBACK; nobody got it
    device = DeviceAgent(settings(broker.url, tmp_path), task, online=lambda: link["up"])
    async with node.running(), serving(device):  # a restart: a new session
        await until(lambda: len(node.updates) == 1, 20)
        box = device.outbox
        assert box is not None
        (update,) = node.updates
        assert (update.sender, update.seq, update.round, update.inc) == (DEV, 0, 1, box.incarnation)
        await node.model(1, receipts={DEV: (box.incarnation + 1, 0)})  # not ours: kept
        link["up"] = False  # the link drops and comes back: a new session again
        await until(lambda: not device.connected, 10)
        link["up"] = True
        await until(lambda: len(node.updates) == 2, 20)
        assert box.backlog().unreceipted == 1
        await node.model(1, receipts={DEV: (box.incarnation, 0)})
        await until(lambda: not box.peek(), 10)
        link["up"] = False
        await until(lambda: not device.connected, 10)
        link["up"] = True
        await until(lambda: device.connected, 10)
        await asyncio.sleep(0.5)  # room for a resend that must not happen
    assert [u.seq for u in node.updates] == [0, 0]
    assert (device.rounds_trained, device.uploader.settled) == (0, 1)


async def test_an_update_whose_receipt_is_late_is_sent_again_after_the_rounds_deadline(
    broker: RunningBroker, tmp_path: Path, quick_resends: None
) -> None:
    task = StepTask()
    node = Node(broker.url, task)
    device = DeviceAgent(settings(broker.url, tmp_path), task)
    async with serving(device):
        async with node.running(listen=False):
            await node.model(1, deadline_s=0.5)
            await until(_delivered(device, 1), 20)
            delivered = time.monotonic()
        async with node.running():  # the gateway subscribes late, in the same device session
            await until(lambda: len(node.updates) == 1, 20)
            late = time.monotonic() - delivered
            box = device.outbox
            assert box is not None
            await node.model(2, receipts={DEV: (box.incarnation, 0)}, deadline_s=60)
            await until(lambda: device.rounds_trained == 2 and len(node.updates) == 2, 20)
            await until(lambda: [e.seq for e in box.peek()] == [1], 10)
    assert late >= 0.9  # delivery.RESEND_MIN_S, here 1 s
    assert [(u.seq, u.round) for u in node.updates] == [(0, 1), (1, 2)]
    assert device.transport is None and device.uploader.settled == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_updates_lost_by_a_restarted_broker_reach_the_gateway_late_and_leave_on_receipt(
    tmp_path: Path, quick_resends: None
) -> None:
    port = _free_port()
    broker = start_mosquitto(port=port)
    task = StepTask()
    device = DeviceAgent(settings(broker.url, tmp_path), task)
    node = Node(broker.url, task)
    try:
        async with serving(device):
            async with node.running(listen=False):
                for version in (1, 2, 3):
                    await node.model(version)
                    await until(lambda v=version: device.rounds_trained == v, 20)
                await until(_delivered(device, 3), 20)
            broker.stop()  # no persistence: what it acknowledged is gone
            broker = start_mosquitto(port=port)
            async with node.running():
                await until(lambda: device.connected, 20)
                # The model says how long a round lasts; the receipt is late after it.
                await node.model(3, deadline_s=0.5)
                await until(lambda: {u.seq for u in node.updates} == {0, 1, 2}, 20)
                box = device.outbox
                assert box is not None and box.backlog().unreceipted == 3
                await node.model(4, receipts={DEV: (box.incarnation, 1)}, deadline_s=60)
                await until(lambda: device.rounds_trained == 4 and len(box.peek()) == 2, 20)
                assert [e.seq for e in box.peek()] == [2, 3]
    finally:
        broker.stop()
    assert all(u.inc == box.incarnation for u in node.updates)


async def test_a_device_whose_outbox_was_emptied_starts_a_new_incarnation_at_seq_0(
    broker: RunningBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = StepTask()
    node = Node(broker.url, task)
    first = DeviceAgent(settings(broker.url, tmp_path), task)
    async with node.running(), serving(first):
        await node.model(1)
        await until(lambda: len(node.updates) == 1, 20)
    (tmp_path / f"device-{DEV}.db").write_bytes(b"")  # a reset storage, as in the field
    second = DeviceAgent(settings(broker.url, tmp_path), task)
    with caplog.at_level(logging.WARNING):
        async with node.running(), serving(second):
            # Its progress went with the file: it trains the retained round again.
            await until(lambda: len(node.updates) == 2, 20)
    old, new = node.updates
    assert (old.seq, old.round, new.seq, new.round) == (0, 1, 0, 1) and old.inc != new.inc
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "moved aside" in errors[0].getMessage()
    assert len(list(tmp_path.glob(f"device-{DEV}.db.corrupt-*"))) == 1


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system for the device's state (tmpfs; needs root on Linux)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root on Linux")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_a_device_on_a_full_disk_keeps_training_and_a_restart_starts(
    broker: RunningBroker, tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = StepTask(size=40_000)  # 40 kB updates, 160 kB of residual per round
    node = Node(broker.url, task)
    device = DeviceAgent(settings(broker.url, tiny_disk), task)
    rounds = 20  # the disk holds about 8 rounds' updates beside the residual
    with caplog.at_level(logging.ERROR):
        async with node.running(listen=False), serving(device):
            for version in range(1, rounds + 1):
                await node.model(version)
                await until(lambda v=version: device.rounds_trained == v, 20)
            box = device.outbox
            assert box is not None
            await until(lambda: len(box) == 0, 10)
            kept = box.backlog().unreceipted
            assert 3 <= kept < rounds and box.evicted == rounds - kept and box.dropped == 0
        (full,) = caplog.records  # one line for a spell; no traceback, no exit
        assert "disk is full" in full.getMessage()
        again = DeviceAgent(settings(broker.url, tiny_disk), task)
        async with node.running(listen=False), serving(again):
            await node.model(rounds + 1)
            await until(lambda: again.rounds_trained == 1, 20)
            assert again.outbox is not None
            assert again.outbox.next_seq(DEV) == rounds + 1 and not again.declined
    assert all("disk is full" in r.getMessage() for r in caplog.records)
