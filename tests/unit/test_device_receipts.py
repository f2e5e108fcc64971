"""A device's outbox drains on the receipt in its gateway's announcement, and only on
its own (incarnation, seq)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

from timeouts import within

from edgefl.config import DeviceSettings
from edgefl.device import DeviceAgent
from edgefl.tasks import load_task, set_torch_threads
from edgefl.topics import Topics
from edgefl.transport import MemoryBroker, MemoryTransport
from edgefl.wire import TrainConfig, decode_update

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from aggregator_fakes import publish_round

TOPICS = Topics()


async def test_the_receipt_in_an_announcement_drains_the_outbox(tmp_path: Path) -> None:
    set_torch_threads(1)
    task = load_task("digits", model="mlp")
    broker = MemoryBroker()
    settings = DeviceSettings(id="dev-1", gateway="gw", state_dir=tmp_path, num_shards=8)
    agent = DeviceAgent(settings, task, transport=broker.factory())
    params = task.init_params(0)
    one = TrainConfig(epochs=1)
    async with MemoryTransport(broker, "gw-node") as gw, agent:
        await gw.subscribe(TOPICS.updates_of("gw"))
        runner = asyncio.create_task(agent.run())
        try:
            updates = []
            for number, receipts in enumerate([{}, "wrong", "right"]):
                if receipts == "wrong":  # another incarnation's, and another device's
                    last = updates[-1]
                    receipts = {"dev-1": (last.inc + 1, 0), "dev-2": (last.inc, 0)}
                elif receipts == "right":
                    receipts = {"dev-1": (updates[-1].inc, 1)}  # covers seq 0 and 1
                await publish_round(
                    gw, TOPICS, "gw", params, round=number, config=one, receipts=receipts
                )
                async with within(30):
                    async for msg in gw.messages():
                        updates.append(decode_update(msg.payload))
                        break
                if receipts and "dev-2" in receipts:
                    assert agent.uploader.settled == 0  # noted before it trained
            assert agent.outbox is not None
            box = agent.outbox
            async with within(10):
                while agent.uploader.settled != 2 or box.backlog().unreceipted != 1:
                    await asyncio.sleep(0.01)
            kept = [e.seq for e in box.peek()]
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    assert [(u.sender, u.seq, u.round) for u in updates] == [("dev-1", s, s) for s in range(3)]
    assert agent.uploader.settled == 2 and kept == [2]  # seq 2 waits for its own receipt
