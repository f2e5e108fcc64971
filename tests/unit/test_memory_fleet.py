"""The shells on the in-memory bus: an aggregation node and a device agent, no broker."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import numpy as np
from timeouts import within

from edgefl.aggregator import Aggregator
from edgefl.config import AggregatorSettings, DeviceSettings
from edgefl.device import DeviceAgent
from edgefl.tasks import load_task, set_torch_threads
from edgefl.topics import Topics
from edgefl.transport import MemoryBroker, MemoryTransport
from edgefl.wire import (
    Status,
    TrainConfig,
    decode_announcement,
    decode_update,
    encode_status,
    encode_update,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from aggregator_fakes import TinyTask, delta_of, make_update, publish_round

TOPICS = Topics()


async def _models(client: MemoryTransport, node: str, out: list) -> None:
    async for msg in client.messages():
        if msg.topic == TOPICS.round(node) and msg.payload:
            out.append(decode_announcement(msg.payload))


async def test_a_node_on_the_memory_bus_folds_its_children_and_publishes_the_average(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    settings = AggregatorSettings(
        id="cloud", role="cloud", state_dir=tmp_path, evaluate=False, max_weight_share=1.0
    )
    async with (
        MemoryTransport(broker, "children") as kids,
        Aggregator(settings, TinyTask(), transport=broker.factory()) as node,
    ):
        models: list = []
        await kids.subscribe(TOPICS.round("cloud"))
        watcher = asyncio.create_task(_models(kids, "cloud", models))
        runner = asyncio.create_task(node.run())
        try:
            for child in ("a", "b"):
                status = encode_status(Status(online=True, id=child))
                await kids.publish(TOPICS.status("cloud", child), status, retain=True)
            async with within(10):
                while not models:
                    await asyncio.sleep(0.01)
            for i, child in enumerate(("a", "b")):
                payload = encode_update(make_update(child, 0, delta_of(i)))
                await kids.publish(TOPICS.update("cloud", child), payload)
            async with within(10):
                while not any(m.version == 1 for m in models):
                    await asyncio.sleep(0.01)
        finally:
            for t in (runner, watcher):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
    init, want = (
        TinyTask().init_params(0),
        {n: (delta_of(0)[n] + delta_of(1)[n]) / 2 for n in delta_of(0)},
    )
    assert node.version == 1 and node.round.number == 1
    for name, value in node.params.items():
        np.testing.assert_allclose(value, init[name] + want[name], atol=1e-6)
    assert models[-1].receipts == {"a": (0, 0), "b": (0, 0)}


async def test_a_device_on_the_memory_bus_trains_the_model_it_is_sent(tmp_path: Path) -> None:
    set_torch_threads(1)
    task = load_task("digits", model="mlp")
    broker = MemoryBroker()
    settings = DeviceSettings(id="dev-1", gateway="gw", state_dir=tmp_path, num_shards=8)
    agent = DeviceAgent(settings, task, transport=broker.factory())
    async with MemoryTransport(broker, "gw-node") as gw, agent:
        await gw.subscribe(TOPICS.updates_of("gw"))
        runner = asyncio.create_task(agent.run())
        try:
            await publish_round(gw, TOPICS, "gw", task.init_params(0), config=TrainConfig(epochs=1))
            async with within(30):
                async for msg in gw.messages():
                    update = decode_update(msg.payload)
                    break
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    assert (update.sender, update.seq, update.round, update.base) == ("dev-1", 0, 0, 0)
    assert update.n == len(task.device_data(0, 8))
