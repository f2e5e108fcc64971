"""A device that cannot load its node's model says so, and its node does not wait for it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

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
    decode_status,
    encode_status,
    encode_update,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from aggregator_fakes import TinyTask, delta_of, make_update, publish_round

TOPICS = Topics()


async def _publish(gw: MemoryTransport, task_model: str, version: int = 0) -> None:
    params = load_task("digits", model=task_model).init_params(0)
    config = TrainConfig(epochs=1)
    await publish_round(gw, TOPICS, "gw", params, version=version, round=version, config=config)


async def _status_with(gw: MemoryTransport, reason: str) -> Status:
    async for msg in gw.messages():
        if msg.topic == TOPICS.status("gw", "dev-1") and msg.payload:
            status = decode_status(msg.payload)
            if status.reason == reason:
                return status
    raise AssertionError("the status topic ended")


async def test_a_device_sent_a_model_it_cannot_load_says_model_mismatch_until_one_fits(
    tmp_path: Path,
) -> None:
    set_torch_threads(1)
    broker = MemoryBroker()
    settings = DeviceSettings(
        id="dev-1", gateway="gw", state_dir=tmp_path, num_shards=8, heartbeat_s=0.2
    )
    agent = DeviceAgent(settings, load_task("digits", model="cnn"), transport=broker.factory())
    async with MemoryTransport(broker, "gw-node") as gw, agent:
        await gw.subscribe(TOPICS.statuses_of("gw"))
        runner = asyncio.create_task(agent.run())
        try:
            await _publish(gw, "mlp")
            async with within(10):
                status = await _status_with(gw, "model_mismatch")
            assert status.online and not status.eligible
            assert agent.ignored["shape"] == 1 and agent.rounds_trained == 0
            await _publish(gw, "cnn", 1)
            async with within(10):
                status = await _status_with(gw, "")
            assert status.eligible
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def test_a_node_leaves_a_mismatched_child_out_of_selection_and_quorum(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    settings = AggregatorSettings(
        id="cloud",
        role="cloud",
        state_dir=tmp_path,
        evaluate=False,
        max_weight_share=1.0,
        train=TrainConfig(deadline_s=600.0),
    )
    async with (
        MemoryTransport(broker, "children") as kids,
        Aggregator(settings, TinyTask(), transport=broker.factory()) as node,
    ):
        runner = asyncio.create_task(node.run())
        try:
            mismatched = Status(online=True, id="b", eligible=False, reason="model_mismatch")
            for status in (Status(online=True, id="a"), mismatched):
                topic = TOPICS.status("cloud", status.id)
                await kids.publish(topic, encode_status(status), retain=True)
            async with within(10):
                while "b" not in node.children.status:
                    await asyncio.sleep(0.01)
            assert node.children.online_eligible == {"a"}
            payload = encode_update(make_update("a", 0, delta_of(0)))
            await kids.publish(TOPICS.update("cloud", "a"), payload)
            async with within(10):  # the round closes on "a" alone, not at its 600 s deadline
                while node.version < 1:
                    await asyncio.sleep(0.01)
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    assert node.version == 1
