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


async def test_a_gateway_whose_rounds_close_at_once_still_tells_its_parent_it_is_there(
    tmp_path: Path,
) -> None:
    """A step that closes a round publishes a due Status first: the parent knows its
    child before the child's sync, however fast the rounds go (a step that closes or
    opens a round returns at once, and a busy gateway's steps all do)."""
    broker = MemoryBroker()
    settings = AggregatorSettings(
        id="gw", role="gateway", parent="cloud", state_dir=tmp_path, evaluate=False,
        min_updates=1, sync_every=1, max_weight_share=1.0,
    )  # fmt: skip
    async with (
        MemoryTransport(broker, "cloud-side") as cloud,
        MemoryTransport(broker, "a") as child,
        Aggregator(settings, TinyTask(), transport=broker.factory()) as node,
    ):
        await cloud.subscribe(TOPICS.status("cloud", "gw"))
        await cloud.subscribe(TOPICS.update("cloud", "gw"))
        seen: list[str] = []

        async def watch() -> None:
            async for msg in cloud.messages():
                seen.append("status" if "/status/" in msg.topic else "sync")

        assert node.link is not None
        watcher, flusher = asyncio.create_task(watch()), None
        try:
            await node.transport.wait_connected(5)
            status = encode_status(Status(online=True, id="a"))
            await child.publish(TOPICS.status("gw", "a"), status, retain=True)
            await node.driver.announce()
            node.receive.on_update("a", encode_update(make_update("a", 0, delta_of(0))))
            await node.driver.step()  # closes the round and stores the sync
            assert node.aggregations == 1 and node.link.buffered == 1
            async with within(5):
                while "status" not in seen:
                    await asyncio.sleep(0.01)
            flusher = asyncio.create_task(node.link.flush())
            async with within(5):
                while "sync" not in seen:
                    await asyncio.sleep(0.01)
        finally:
            for t in (watcher, flusher):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
    assert seen == ["status", "sync"]
