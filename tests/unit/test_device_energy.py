"""A device's energy per round, its duty cycle and its daily budget, on the in-memory bus."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from timeouts import within

from edgefl.config import DeviceSettings
from edgefl.device import DeviceAgent
from edgefl.tasks import load_task, set_torch_threads
from edgefl.topics import Topics
from edgefl.transport import MemoryBroker, MemoryTransport
from edgefl.wire import Model, TrainConfig, decode_status, encode_model, model_tensors

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from aggregator_fakes import publish_round

TOPICS = Topics()


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[DeviceAgent, MemoryTransport]]:
    """A device on the memory bus and the gateway's side of it, subscribed to its topics."""
    set_torch_threads(1)
    task = load_task("digits", model="mlp")
    broker = MemoryBroker()
    cfg = DeviceSettings(id="dev-1", gateway="gw", state_dir=tmp_path, num_shards=8, **settings)
    agent = DeviceAgent(cfg, task, transport=broker.factory())
    async with MemoryTransport(broker, "gw-node") as gw, agent:
        await gw.subscribe(TOPICS.updates_of("gw"))
        await gw.subscribe(TOPICS.statuses_of("gw"))
        runner = asyncio.create_task(agent.run())
        try:
            yield agent, gw
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def play_round(gw: MemoryTransport, agent: DeviceAgent, number: int) -> int:
    """The gateway's round ``number`` on version 0; the size of the model it retains."""
    params = agent.task.init_params(0)
    await publish_round(gw, TOPICS, "gw", params, round=number, config=TrainConfig(epochs=1))
    return len(encode_model(Model(sender="gw", version=0, tensors=model_tensors(params))))


async def until(agent: DeviceAgent, event: str, number: int) -> dict[str, Any]:
    async with within(30):
        while not (
            agent.last_metrics.get("event") == event and agent.last_metrics.get("round") == number
        ):
            await asyncio.sleep(0.01)
    return dict(agent.last_metrics)


async def test_energy_per_round_is_the_power_model_of_its_train_time_and_bytes(
    tmp_path: Path,
) -> None:
    energy = {"board": "pi5", "train_w": 10.0, "up_j_per_mb": 2.0, "down_j_per_mb": 1.0}
    async with running(tmp_path, energy=energy) as (agent, gw):
        model_bytes = await play_round(gw, agent, 0)
        m = await until(agent, "round", 0)
    train_j = 10.0 * float(m["train_ms"]) / 1000.0
    radio_j = (2.0 * int(m["upload_bytes"]) + 1.0 * model_bytes) / 1e6
    assert m["download_bytes"] == model_bytes
    assert m["energy_train_j"] == pytest.approx(train_j, abs=1e-6)
    assert m["energy_radio_j"] == pytest.approx(radio_j, abs=1e-6)
    assert m["energy_j"] == pytest.approx(train_j + radio_j, abs=1e-6)
    assert m["energy_day_j"] == pytest.approx(m["energy_j"], abs=1e-6)
    assert agent.energy.usage.rounds_within(agent.clock()) == 1


@pytest.mark.parametrize(
    ("policy", "reason"),
    [({"max_rounds_per_hour": 1}, "duty_cycle"), ({"daily_energy_j": 1e-3}, "energy_budget")],
)
async def test_a_device_at_its_cap_declines_the_next_round_and_says_why(
    tmp_path: Path, policy: dict[str, Any], reason: str
) -> None:
    async with running(tmp_path, policy=policy) as (agent, gw):
        await play_round(gw, agent, 0)
        await until(agent, "round", 0)  # the first round is within the cap
        await play_round(gw, agent, 1)
        declined = await until(agent, "declined", 1)
        async with within(10):
            async for msg in gw.messages():
                if msg.topic == TOPICS.status("gw", "dev-1") and msg.payload:
                    status = decode_status(msg.payload)
                    if status.declined == 1:
                        break
    assert declined["reason"] == reason
    assert (status.eligible, status.reason) == (False, reason)
    assert agent.declined[reason] == 1 and agent.rounds_trained == 1


async def test_declines_for_the_same_reason_log_once_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgefl.device.rounds")
    async with running(tmp_path, policy={"max_rounds_per_hour": 1}) as (agent, gw):
        await play_round(gw, agent, 0)
        await until(agent, "round", 0)
        for number in (1, 2, 3):
            await play_round(gw, agent, number)
            await until(agent, "declined", number)
    declines = [r for r in caplog.records if "declined: duty_cycle" in r.getMessage()]
    assert [r.levelno for r in declines] == [logging.INFO, logging.DEBUG, logging.DEBUG]
