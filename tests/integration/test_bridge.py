"""The bridged topology for real: a gateway's own Mosquitto bridged over TLS to the cloud's.

Both brokers run the shipped configs (gateways/mosquitto-bridge.conf,
cloud/mosquitto-secure.conf) with users from ``edgefl credentials``. The cloud
broker goes away for a few gateway rounds and comes back on the same port.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from secure_fleet import ConfBroker, bridged_gateway_broker, secure_broker, serving, until

from edgefl.aggregator import Aggregator
from edgefl.config import AggregatorSettings, DeviceSettings, MqttSettings
from edgefl.device import DeviceAgent
from edgefl.tasks import load_task
from edgefl.wire import TrainConfig

pytestmark = pytest.mark.integration

DEVICES = ("dev-1", "dev-2")


def login(broker: ConfBroker, user: str) -> MqttSettings:
    return MqttSettings(
        broker=f"127.0.0.1:{broker.port}",
        username=user,
        password=broker.passwords[user],
        reconnect_min_s=0.1,
        reconnect_max_s=1.0,
    )


def device(dev: str, shard: int, mqtt: MqttSettings, state_dir: Path) -> DeviceSettings:
    return DeviceSettings(
        id=dev, gateway="gw-1", shard=shard, num_shards=len(DEVICES), mqtt=mqtt,
        state_dir=state_dir, compute="cpu",
    )  # fmt: skip


async def test_gateway_rounds_go_on_while_the_uplink_is_down_and_sync_when_it_returns(
    tmp_path: Path,
) -> None:
    cloud_broker = secure_broker(tmp_path / "cloud", {"cloud": ("cloud", None),
                                                      "gw-1": ("gateway", None)})  # fmt: skip
    local_users = {"gw-1": ("gateway", None), **{d: ("device", "gw-1") for d in DEVICES}}
    try:
        local_broker = bridged_gateway_broker(tmp_path / "gw-1", cloud_broker, "gw-1", local_users)
    except BaseException:
        cloud_broker.stop()
        raise
    task = load_task("digits", model="mlp")
    # A short deadline: after each sync the gateway waits at most this long for
    # the cloud's answer before its next local round.
    train = TrainConfig(epochs=1, lr=0.1, deadline_s=2)
    common = {"state_dir": tmp_path / "state", "checkpoint": False, "train": train}
    cloud = Aggregator(
        AggregatorSettings(id="cloud", role="cloud", mqtt=login(cloud_broker, "cloud"), **common),
        task,
    )
    gateway = Aggregator(
        AggregatorSettings(id="gw-1", role="gateway", mqtt=login(local_broker, "gw-1"), **common),
        task,
    )
    state = tmp_path / "state"
    devices = [
        DeviceAgent(device(d, i, login(local_broker, d), state), task)
        for i, d in enumerate(DEVICES)
    ]
    assert gateway.sync is not None
    sync = gateway.sync
    try:
        async with serving(cloud, gateway, *devices):
            # The bridge carries syncs up and the cloud's model down.
            await until(lambda: sync.parent_version >= 1, timeout=60)

            cloud_broker.stop()
            adopted, cloud_version = sync.parent_version, cloud.version
            rounds_before = gateway.aggregations
            await until(lambda: gateway.aggregations >= rounds_before + 3, timeout=60)
            assert sync.parent_version == adopted  # nothing came from the cloud meanwhile
            assert gateway.last_metrics["participants"] == len(DEVICES)
            # One sync waits for the cloud's receipt; the rounds after it wait for the next.
            assert sync.inflight is not None and sync.samples_since_sync > 0
            last_sync = sync.inflight.seq
            # Every sync is handed to the local broker, whose bridge holds it.
            outbox = gateway.outbox
            assert outbox is not None
            await until(lambda: len(outbox) == 0, timeout=10)

            cloud_broker.start()  # same ports, same persisted sessions
            await until(
                lambda: cloud.gate.ledger.last_seqs().get("gw-1", -1) >= last_sync, timeout=60
            )
            await until(lambda: sync.parent_version > adopted, timeout=60)
            assert cloud.version > cloud_version
            relayed = gateway.version  # the gateway's model built on the new global one
            await until(
                lambda: all((d.progress.model_version or 0) >= relayed for d in devices),
                timeout=60,
            )
    finally:
        local_broker.stop()
        cloud_broker.stop()
    rejected = {k: v for k, v in cloud.last_metrics.items() if k.startswith("rejected_") and v}
    assert rejected == {}, rejected
