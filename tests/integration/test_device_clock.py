"""A board whose clock is wrong (no RTC before NTP) still trains within the deadline, and a
device that declines a round says so, so that its node stops waiting for it."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from edgefl import wire
from edgefl.broker import RunningBroker
from edgefl.device import DeviceAgent
from edgefl.tasks import Task, load_task, set_torch_threads

sys.path.insert(0, str(Path(__file__).parent))
from aggregator_fakes import publish_round
from test_device import DEV, GW, TOPICS, Gateway, device_settings, serving

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def task() -> Task:
    set_torch_threads(1)
    return load_task("digits", model="mlp")


async def _publish(gw: Gateway, task: Task, *, round_: int, left_s: float, node_now: float) -> None:
    await publish_round(
        gw.transport, TOPICS, GW, task.init_params(0), version=1, round=round_,
        config=wire.TrainConfig(epochs=1, lr=0.1), deadline=node_now + left_s, sent_at=node_now,
    )  # fmt: skip


@pytest.mark.parametrize("offset_s", [3600.0, -3600.0])
async def test_a_device_whose_clock_is_an_hour_off_trains_the_round(
    broker: RunningBroker, tmp_path: Path, task: Task, offset_s: float
) -> None:
    agent = DeviceAgent(
        device_settings(broker.url, tmp_path), task, clock=lambda: time.time() + offset_s
    )
    async with Gateway(broker.url).running() as gw, serving(agent):
        await _publish(gw, task, round_=1, left_s=30.0, node_now=time.time())
        await gw.until(lambda: bool(gw.updates), 30)
    assert [u.round for u in gw.updates] == [1] and agent.declined == {}


async def test_a_declined_round_is_named_in_the_status(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    agent = DeviceAgent(device_settings(broker.url, tmp_path), task)
    async with Gateway(broker.url).running() as gw, serving(agent):
        # The round's deadline had passed when the node published it.
        await _publish(gw, task, round_=4, left_s=-1.0, node_now=time.time())
        await gw.until(lambda: any(s.declined == 4 for s in gw.statuses), 10)
        status = next(s for s in gw.statuses if s.declined == 4)
        await asyncio.sleep(0.2)
    assert status.id == DEV and status.reason == "deadline_passed"
    assert status.eligible  # a late model says nothing about the device: next round it trains
    assert gw.updates == [] and agent.declined == {"deadline_passed": 1}
