"""A node's minimum interval between rounds, on the in-memory bus with eager children."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from pathlib import Path

from timeouts import within

from edgefl.aggregator import Aggregator
from edgefl.config import AggregatorSettings
from edgefl.topics import Topics
from edgefl.transport import MemoryBroker, MemoryTransport
from edgefl.wire import Status, decode_model, encode_status, encode_update

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from aggregator_fakes import TinyTask, delta_of, make_update

TOPICS = Topics()
INTERVAL_S = 0.3


async def _answer_every_round(kids: MemoryTransport, opened: dict[int, float]) -> None:
    """Both children send their update the moment a new round's model appears."""
    seq = 0
    async for msg in kids.messages():
        if msg.topic != TOPICS.model("cloud") or not msg.payload:
            continue
        model = decode_model(msg.payload)
        if model.round in opened:
            continue
        opened[model.round] = model.sent_at
        for i, child in enumerate(("a", "b")):
            update = make_update(child, seq, delta_of(i), base=model.version, round=model.round)
            await kids.publish(TOPICS.update("cloud", child), encode_update(update))
        seq += 1


async def test_no_two_rounds_open_closer_than_the_minimum_interval(tmp_path: Path) -> None:
    broker = MemoryBroker()
    settings = AggregatorSettings(
        id="cloud",
        tier="cloud",
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
        await kids.subscribe(TOPICS.model("cloud"))
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
