"""A node's minimum interval between rounds, on the in-memory bus with eager children."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from pathlib import Path

import pytest
from timeouts import within

from edgefl.aggregator import Aggregator
from edgefl.config import AggregatorSettings, DeviceSettings, load_settings
from edgefl.topics import Topics
from edgefl.transport import MemoryBroker, MemoryTransport
from edgefl.wire import Status, TrainConfig, decode_announcement, encode_status, encode_update

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from aggregator_fakes import TinyTask, delta_of, make_update

TOPICS = Topics()
REPO = Path(__file__).resolve().parents[2]
INTERVAL_S = 0.3
DEADLINE_S = TrainConfig().deadline_s


async def _answer_every_round(kids: MemoryTransport, opened: dict[int, float]) -> None:
    """Both children send their update the moment a new round is announced."""
    seq = 0
    async for msg in kids.messages():
        if msg.topic != TOPICS.round("cloud") or not msg.payload:
            continue
        ann = decode_announcement(msg.payload)
        if ann.round in opened:
            continue
        opened[ann.round] = ann.deadline - DEADLINE_S  # when the node opened it, on its clock
        for i, child in enumerate(("a", "b")):
            update = make_update(child, seq, delta_of(i), base=ann.version, round=ann.round)
            await kids.publish(TOPICS.update("cloud", child), encode_update(update))
        seq += 1


async def test_no_two_rounds_open_closer_than_the_minimum_interval(tmp_path: Path) -> None:
    broker = MemoryBroker()
    settings = AggregatorSettings(
        id="cloud",
        role="cloud",
        state_dir=tmp_path,
        evaluate=False,
        max_weight_share=1.0,
        min_updates=2,
        min_round_interval_s=INTERVAL_S,
    )
    opened: dict[int, float] = {}
    async with (
        MemoryTransport(broker, "children") as kids,
        Aggregator(settings, TinyTask(), transport=broker.factory()) as node,
    ):
        await kids.subscribe(TOPICS.round("cloud"))
        for child in ("a", "b"):
            status = encode_status(Status(online=True, id=child))
            await kids.publish(TOPICS.status("cloud", child), status, retain=True)
        answering = asyncio.create_task(_answer_every_round(kids, opened))
        runner = asyncio.create_task(node.run())
        try:
            async with within(10):
                while len(opened) < 4:
                    await asyncio.sleep(0.01)
        finally:
            for t in (runner, answering):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
    times = [opened[r] for r in sorted(opened)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert node.version >= 3  # every round closed on its two updates at once
    assert min(gaps) >= INTERVAL_S, gaps
    assert max(gaps) < INTERVAL_S + 0.25, gaps  # and it opened when the interval was up


def test_the_kits_pace_rounds_for_a_battery_board(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("EDGEFL_")]:
        monkeypatch.delenv(name)
    gateway = load_settings(AggregatorSettings, REPO / "gateways" / "gateway.toml")
    cloud = load_settings(AggregatorSettings, REPO / "cloud" / "cloud.toml")
    per_hour = 3600 / gateway.min_round_interval_s
    assert per_hour <= 12
    assert cloud.min_round_interval_s >= gateway.min_round_interval_s * gateway.sync_every
    for kit in sorted((REPO / "devices").glob("*.toml")):
        device = load_settings(DeviceSettings, kit)
        # A cap below the gateway's pace would decline paced rounds; none at all, no cap.
        assert per_hour < device.policy.max_rounds_per_hour <= 60, kit.name
