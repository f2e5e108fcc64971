"""Forged models on a real broker: signatures, versions and training-config bounds.

An attacker who can publish on a node's model topic plays the parent here
(``aggregator_fakes.harness``); devices train digits, gateways run the tiny task.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.aggregator import Aggregator
from edgefl.broker import RunningBroker
from edgefl.config import AggregatorSettings, DeviceSettings
from edgefl.device import DeviceAgent
from edgefl.params import Params
from edgefl.signing import (
    generate_key_pair,
    load_private_key,
    load_public_key,
    verify_model,
)
from edgefl.tasks import Task, load_task, set_torch_threads
from edgefl.wire import Reason, TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from aggregator_fakes import Harness, TinyTask, harness, publish_round
from secure_fleet import serving, until

pytestmark = pytest.mark.integration

GW = "gw-t"


@pytest.fixture(scope="module")
def task() -> Task:
    set_torch_threads(1)
    return load_task("digits", model="mlp")


class AsNode:
    """The harness's client as a node publishes: QoS 1, retained."""

    def __init__(self, h: Harness) -> None:
        self.client = h.client

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await self.client.publish(topic, payload, qos=1, retain=retain)


async def publish(
    h: Harness,
    node: str,
    params: Params,
    version: int,
    key: Ed25519PrivateKey | None = None,
    **config: Any,
) -> None:
    """Play ``node``: the whole model of ``version`` and its round, signed with ``key``."""
    await publish_round(
        AsNode(h), h.topics, node, params, version=version, key=key, round=version,
        config=TrainConfig(**{"epochs": 1, **config}), deadline=time.time() + 60,
    )  # fmt: skip


def device(broker: RunningBroker, tmp_path: Path, task: Task, **extra: Any) -> DeviceAgent:
    settings = DeviceSettings(
        id="dev-1", gateway=GW, mqtt={"broker": broker.url}, state_dir=tmp_path,
        num_shards=8, compute="cpu", **extra,
    )  # fmt: skip
    return DeviceAgent(settings, task)


# ------------------------------------------------------------------- devices


async def test_a_device_with_a_parent_key_trains_only_on_models_its_gateway_signed(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    private, public = generate_key_pair()
    stranger = load_private_key(generate_key_pair()[0])
    params = task.init_params(0)
    rotated = {n: np.roll(a, 1, axis=0) for n, a in params.items()}
    agent = device(broker, tmp_path, task, parent_key=public)
    async with harness(broker.url) as h, serving(agent):
        await until(lambda: agent.connected, 20)
        await publish(h, GW, rotated, 1, None, epochs=100, batch_size=1)  # unsigned
        await until(lambda: agent.ignored[Reason.BAD_SIGNATURE.value] == 1, 20)
        await publish(h, GW, rotated, 2, stranger)  # signed, by someone else
        await until(lambda: agent.ignored[Reason.BAD_SIGNATURE.value] == 2, 20)
        await publish(h, GW, params, 3, load_private_key(private))
        await until(lambda: agent.last_metrics.get("version") == 3, 20)
    assert agent.rounds_trained == 1 and agent.progress.trained == (3, 3)
    assert agent.last_metrics["version"] == 3 and agent.progress.model_version == 3


async def test_a_device_refuses_older_versions_and_unsigned_leaps_ahead(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    params = task.init_params(0)
    agent = device(broker, tmp_path, task, max_version_jump=10)
    async with harness(broker.url) as h, serving(agent):
        await until(lambda: agent.connected, 20)
        await publish(h, GW, params, 5)
        await until(lambda: agent.rounds_trained == 1, 20)
        await publish(h, GW, params, 16)  # 11 ahead, unsigned
        await until(lambda: agent.ignored[Reason.VERSION.value] == 1, 20)
        await publish(h, GW, params, 4)  # back
        await until(lambda: agent.ignored[Reason.VERSION.value] == 2, 20)
        await publish(h, GW, params, 15)  # 10 ahead: within the bound
        await until(lambda: agent.rounds_trained == 2, 20)
    assert agent.progress.trained == (15, 15) and agent.progress.model_version == 15
    assert dict(agent.ignored) == {Reason.VERSION.value: 2}


async def test_a_forged_training_config_is_clamped_to_the_devices_bounds(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    agent = device(broker, tmp_path, task, max_epochs=2, min_batch_size=64)
    async with harness(broker.url) as h, serving(agent):
        await until(lambda: agent.connected, 20)
        await publish(h, GW, task.init_params(0), 1, None, epochs=100, batch_size=1)
        await until(lambda: agent.last_metrics.get("event") == "round", 20)
    record = agent.last_metrics
    assert agent.clamped == 1 and record["epochs"] == 2
    assert record["steps"] == 2 * math.ceil(len(agent.data) / 64)


async def test_training_past_max_train_s_is_stopped_and_the_round_skipped(
    broker: RunningBroker, tmp_path: Path, task: Task
) -> None:
    agent = device(broker, tmp_path, task, max_epochs=1000, min_batch_size=1, max_train_s=0.5)
    async with harness(broker.url) as h, serving(agent):
        await until(lambda: agent.connected, 20)
        started = time.monotonic()
        await publish(h, GW, task.init_params(0), 1, None, epochs=1000, batch_size=1)
        await until(lambda: agent.declined["train_failed"] == 1, 20)
        elapsed = time.monotonic() - started
    assert agent.rounds_trained == 0 and agent.outbox is not None
    assert elapsed < 5.0, elapsed  # 1,000 epochs at batch size 1 would take minutes


# ------------------------------------------------------------------ gateways


def gateway(broker: RunningBroker, tmp_path: Path, **extra: Any) -> Aggregator:
    settings = AggregatorSettings(
        id="gw-1", role="gateway", parent="cloud", mqtt={"broker": broker.url},
        state_dir=tmp_path, checkpoint=False, train={"deadline_s": 60}, **extra,
    )  # fmt: skip
    return Aggregator(settings, TinyTask())


async def test_a_gateway_with_a_parent_key_adopts_only_models_the_cloud_signed(
    broker: RunningBroker, tmp_path: Path
) -> None:
    cloud_private, cloud_public = generate_key_pair()
    own_private, own_public = generate_key_pair()
    stranger = load_private_key(generate_key_pair()[0])
    cloud_key = load_private_key(cloud_private)
    params = TinyTask().init_params(0)
    forged = {n: -a for n, a in params.items()}
    node = gateway(broker, tmp_path, parent_key=cloud_public, model_key=own_private)
    async with harness(broker.url) as h, serving(node):
        verify_model(await h.wait_model("gw-1", 0), load_public_key(own_public))
        assert node.link is not None
        rejected = node.rejected.counts
        # Each refused twice: the announcement, and the whole model (a gateway that
        # holds nothing of its parent's is subscribed to it).
        await publish(h, "cloud", forged, 1)
        await until(lambda: rejected[Reason.BAD_SIGNATURE] == 2, 20)
        await publish(h, "cloud", forged, 2, stranger)
        await until(lambda: rejected[Reason.BAD_SIGNATURE] == 4, 20)
        assert node.link.sync.parent_version == 0
        await publish(h, "cloud", params, 3, cloud_key)
        adopted = await h.wait_model("gw-1", 1, timeout=20)  # signed by the gateway in turn
        verify_model(adopted, load_public_key(own_public))
        assert node.link.sync.parent_version == 3
        await publish(h, "cloud", params, 2, cloud_key)  # an old one, replayed
        await until(lambda: rejected[Reason.VERSION] == 1, 20)
    assert node.link.sync.parent_version == 3 and node.version == 1


async def test_a_gateway_without_a_parent_key_refuses_an_unsigned_leap_ahead(
    broker: RunningBroker, tmp_path: Path
) -> None:
    params = TinyTask().init_params(0)
    node = gateway(broker, tmp_path, max_version_jump=100)
    async with harness(broker.url) as h, serving(node):
        await h.wait_model("gw-1", 0)
        assert node.link is not None
        await publish(h, "cloud", params, 1000)
        # Both refused: the announcement, and the whole model (a gateway that holds
        # nothing of its parent's is subscribed to it).
        await until(lambda: node.rejected.counts[Reason.VERSION] == 2, 20)
        assert node.link.sync.parent_version == 0
        await publish(h, "cloud", params, 100)
        await until(lambda: node.link is not None and node.link.sync.parent_version == 100, 20)
    assert node.rejected.counts[Reason.VERSION] == 2  # 100 ahead: within the bound
