"""The device's event loop never waits on its storage: every outbox call runs off the loop.

The disk is made slow (each use of the sqlite connection sleeps), and every call is
recorded with the thread it ran on; one on the event loop's thread is a stall of
the whole agent (its MQTT session, status and receipts) for as long as the disk takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from timeouts import within

from edgefl.config import DeviceSettings
from edgefl.device import DeviceAgent
from edgefl.outbox import Outbox
from edgefl.tasks import load_task, set_torch_threads
from edgefl.topics import Topics
from edgefl.transport import MemoryBroker, MemoryTransport
from edgefl.wire import TrainConfig, decode_update

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from aggregator_fakes import publish_round

TOPICS = Topics()
SLOW_DISK_S = 0.01


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every storage call sleeps SLOW_DISK_S; returns (caller, thread id) of each call."""
    calls: list[tuple[str, int]] = []
    conn = Outbox._conn

    def slow(self: Outbox) -> Any:
        import sys

        calls.append((sys._getframe(1).f_code.co_name, threading.get_ident()))
        time.sleep(SLOW_DISK_S)
        return conn(self)

    monkeypatch.setattr(Outbox, "_conn", slow)
    return calls


async def test_a_device_on_a_slow_disk_never_touches_storage_on_its_event_loop(
    tmp_path: Path, slow_disk: list[tuple[str, int]]
) -> None:
    set_torch_threads(1)
    task = load_task("digits", model="mlp")
    broker = MemoryBroker()
    settings = DeviceSettings(
        id="dev-1", gateway="gw", state_dir=tmp_path, num_shards=8, heartbeat_s=0.05
    )
    loop_thread = threading.get_ident()
    agent = DeviceAgent(settings, task, transport=broker.factory())
    updates = []
    async with MemoryTransport(broker, "gw-node") as gw, agent:
        await gw.subscribe(TOPICS.updates_of("gw"))
        runner = asyncio.create_task(agent.run())
        try:
            for version in range(2):  # a round, then its receipt with the next round
                receipts = {"dev-1": (updates[-1].inc, updates[-1].seq)} if updates else {}
                await publish_round(
                    gw, TOPICS, "gw", task.init_params(version), version=version,
                    round=version, config=TrainConfig(epochs=1), receipts=receipts,
                )  # fmt: skip
                async with within(60):
                    async for msg in gw.messages():
                        updates.append(decode_update(msg.payload))
                        break
            async with within(30):
                while agent.outbox is None or agent.uploader.settled < 1:
                    await asyncio.sleep(0.01)
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    assert [u.seq for u in updates] == [0, 1]
    assert len(slow_disk) > 10  # the slow disk was used: puts, state, receipts, counts
    on_loop = sorted({caller for caller, thread in slow_disk if thread == loop_thread})
    assert on_loop == [], f"storage calls on the event loop: {on_loop}"
