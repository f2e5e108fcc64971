"""A child of a real node on the memory bus: joining late it fetches the whole model,
then follows the deltas; after a gap it fetches the whole model again. Bit-identical
to what the node holds for its children at every version; with ``whole_model = "u8"``
within half a quantization step of it, an offset the deltas carry unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest
from timeouts import within

from edgefl.aggregator import Aggregator
from edgefl.config import AggregatorSettings
from edgefl.fetch import ModelFeed
from edgefl.topics import Topics
from edgefl.transport import MemoryBroker, MemoryTransport
from edgefl.wire import Announcement, Status, encode_status, encode_update

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from aggregator_fakes import SHAPES, TinyTask, delta_of, make_update

TOPICS = Topics()
KIDS = ("a", "b")


class Child:
    """A child's downlink (``ModelFeed``) on its own session: what it held, per version."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.transport = MemoryTransport(broker, "late")
        self.feed = ModelFeed(TOPICS, "cloud", spec=SHAPES, public=None, max_jump=100)
        self.held: dict[int, dict[str, bytes]] = {}

    async def follow(self) -> None:
        await self.feed.refresh(self.transport, None)
        async for msg in self.transport.messages():
            got = self.feed.on_message(msg.topic, msg.payload)
            if got is True and self.feed.held is not None and self.feed.version is not None:
                self.held[self.feed.version] = {n: a.tobytes() for n, a in self.feed.held.items()}
            version = got.version if isinstance(got, Announcement) else self.feed.seen
            await self.feed.refresh(self.transport, version)


async def _round(kids: MemoryTransport, node: Aggregator, seq: int) -> None:
    version = node.version
    for i, child in enumerate(KIDS):
        update = make_update(
            child, seq, delta_of(10 * seq + i), base=version, round=node.round.number
        )
        await kids.publish(TOPICS.update("cloud", child), encode_update(update))
    async with within(10):
        while node.downlink.version != version + 1:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("whole_model", ["exact", "u8"])
async def test_a_late_child_fetches_the_whole_model_then_follows_deltas_and_a_gap_refetches(
    tmp_path: Path, whole_model: str
) -> None:
    broker = MemoryBroker()
    settings = AggregatorSettings(
        id="cloud",
        role="cloud",
        state_dir=tmp_path,
        evaluate=False,
        max_weight_share=1.0,
        whole_model=whole_model,
    )
    shared: dict[int, dict[str, bytes]] = {}
    async with (
        MemoryTransport(broker, "children") as kids,
        Aggregator(settings, TinyTask(), transport=broker.factory()) as node,
    ):
        runner = asyncio.create_task(node.run())
        late = Child(broker)
        follower: asyncio.Task[None] | None = None
        try:
            for child in KIDS:
                status = encode_status(Status(online=True, id=child))
                await kids.publish(TOPICS.status("cloud", child), status, retain=True)
            async with within(10):
                while node.downlink.version is None:  # v0, announced
                    await asyncio.sleep(0.01)
            for seq in range(8):
                if seq in (3, 7):  # joins at v3 with nothing held; back at v7 holding v5
                    if seq == 3:
                        await late.transport.__aenter__()
                    follower = asyncio.create_task(late.follow())
                if seq in (3, 4, 5, 7):
                    async with within(10):
                        while node.version not in late.held:
                            await asyncio.sleep(0.01)
                if seq == 5 and follower is not None:  # away for v6
                    follower.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await follower
                    for topic in sorted(late.feed.subscribed):
                        await late.transport.unsubscribe(topic)
                    late.feed.subscribed = set()
                held = node.downlink.shared.held
                assert held is not None
                shared[node.version] = {n: a.tobytes() for n, a in held.items()}
                await _round(kids, node, seq)
            held = node.downlink.shared.held
            assert held is not None
            shared[node.version] = {n: a.tobytes() for n, a in held.items()}
            async with within(10):
                while node.version not in late.held:
                    await asyncio.sleep(0.01)
        finally:
            for t in (runner, follower):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            await late.transport.__aexit__(None, None, None)
    assert node.version == 8
    # Whole at v3, deltas to v5, whole again at v7 (its delta is from v6), then a delta.
    assert sorted(late.held) == [3, 4, 5, 7, 8]
    assert late.feed.gaps == 0  # back at v7 holding v5: the whole model at once, no delta first
    if whole_model == "exact":
        assert all(late.held[v] == shared[v] for v in late.held)  # bit-identical
        return
    for fetched, followed in ((3, (4, 5)), (7, (8,))):
        for name, raw in shared[fetched].items():
            node = np.frombuffer(raw, "f4")
            step = (float(node.max()) - float(node.min())) / 255
            off = np.frombuffer(late.held[fetched][name], "f4") - node
            assert float(np.abs(off).max()) <= step / 2 * (1 + 1e-5) + 1e-7, name
            for v in followed:  # the deltas move both the same way: the offset stays
                moved = np.frombuffer(late.held[v][name], "f4") - np.frombuffer(
                    shared[v][name], "f4"
                )
                assert np.allclose(moved, off, rtol=0, atol=1e-6), (name, v)
