"""On a real broker, a device that a round does not select receives its announcement
and nothing else: under a kilobyte per round, counted as whole PUBLISH packets."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgefl.aggregator.retained import Downlink
from edgefl.broker import RunningBroker
from edgefl.device import DeviceAgent
from edgefl.downlink import Shared
from edgefl.tasks import Task, load_task, set_torch_threads
from edgefl.wire import DEFAULT_MAX_MESSAGE_BYTES, Announcement, TrainConfig, encode_announcement

sys.path.insert(0, str(Path(__file__).parent))
from test_device import DEV, GW, TOPICS, Gateway, device_settings, serving

pytestmark = pytest.mark.integration

OTHERS = [f"dev-{i:03d}" for i in range(10)]  # the round's selection, without us


@pytest.fixture(scope="module")
def task() -> Task:
    set_torch_threads(1)
    return load_task("digits", model="mlp")


def _round(version: int, selected: list[str]) -> bytes:
    now = time.time()
    return encode_announcement(
        Announcement(
            sender=GW, version=version, round=version, config=TrainConfig(epochs=1),
            selected=selected, deadline=now + 60, sent_at=now,
            receipts={c: (4_000_000_000, version) for c in OTHERS},
        )
    )  # fmt: skip


async def test_an_unselected_device_receives_under_a_kilobyte_per_round(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    agent = DeviceAgent(device_settings(broker.url, tmp_path), task)
    rng = np.random.default_rng(0)
    params = task.init_params(0)
    async with Gateway(broker.url).running() as gw, serving(agent):
        downlink = Downlink(
            gw.transport,
            TOPICS,
            GW,
            DEFAULT_MAX_MESSAGE_BYTES,
            Shared(GW, codec="topk", fraction=0.1),
        )
        await gw.until(lambda: agent.connected, 10)
        marks = []
        for version in range(5):  # the node's publish path: delta, whole model, round
            params = {
                n: a + 0.01 * rng.standard_normal(a.shape, np.float32) for n, a in params.items()
            }
            await downlink.publish_version(params, version, None)
            await downlink.announce(_round(version, OTHERS))
            await gw.until(lambda v=version: agent.feed.seen == v, 10)  # type: ignore[misc]
            assert agent.transport is not None
            marks.append(agent.transport.wire_in)
        per_round = np.diff(marks)
        # Selected at last: the same counter sees the whole model come.
        await downlink.publish_version(params, 5, None)
        await downlink.announce(_round(5, [DEV]))
        await gw.until(lambda: agent.feed.version == 5, 20)
        fetched = agent.transport.wire_in - marks[-1]
    print(f"unselected: {per_round.tolist()} B per round; selected: {fetched} B")
    assert len(per_round) == 4 and all(300 < b < 1000 for b in per_round)
    assert fetched > downlink.model_bytes > 10_000
    assert agent.feed.held is not None and all(
        np.array_equal(agent.feed.held[n], downlink.shared.held[n])  # type: ignore[index]
        for n in params
    )
