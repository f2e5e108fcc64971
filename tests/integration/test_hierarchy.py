"""Devices -> gateways -> cloud on a real Mosquitto: exact averages at every tier, and learning."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefl.aggregator import Aggregator
from edgefl.broker import RunningBroker
from edgefl.codecs import decode_params, encode_params
from edgefl.config import AggregatorSettings, DeviceSettings
from edgefl.device import DeviceAgent
from edgefl.params import Params
from edgefl.profiles import Reading
from edgefl.tasks import Task

sys.path.insert(0, str(Path(__file__).parent))
from aggregator_fakes import TinyTask, delta_of, harness, make_update, params_of

pytestmark = pytest.mark.integration

#: children of each gateway and the samples (n) each one reports
FLEET = {"gw1": {"a1": 10, "a2": 30}, "gw2": {"b1": 5, "b2": 20, "b3": 15}}


def _node(broker: RunningBroker, tmp_path: Path, node_id: str, **kw: Any) -> AggregatorSettings:
    role = "cloud" if node_id == "cloud" else "gateway"
    return AggregatorSettings(
        id=node_id,
        role=role,
        parent=None if role == "cloud" else "cloud",
        mqtt={"broker": broker.url},
        state_dir=tmp_path,
        **kw,
    )


#: Plain sample-weighted FedAvg, which these tests check exactly: no share cap, no clip,
#: and float32 downlink deltas (the published model is the node's, to float rounding).
PLAIN = {"max_weight_share": 1.0, "clip_factor": 0.0, "downlink_codec": "f32"}


@contextlib.asynccontextmanager
async def serving(nodes: list[AggregatorSettings], task: Task) -> AsyncIterator[list[Aggregator]]:
    async with contextlib.AsyncExitStack() as stack:
        running = [await stack.enter_async_context(Aggregator(s, task)) for s in nodes]
        tasks = [asyncio.create_task(n.run()) for n in running]
        try:
            yield running
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _mean(models: Mapping[str, Params], weights: Mapping[str, float]) -> Params:
    total = sum(weights.values())
    names = next(iter(models.values())).keys()
    return {
        n: sum(weights[k] * models[k][n].astype(np.float64) for k in models) / total for n in names
    }


def _close(got: Params, want: Params) -> float:
    return max(float(np.abs(got[n] - want[n]).max()) for n in want)


@pytest.mark.parametrize("dtype", ["f32", "u8"])
async def test_each_tier_publishes_the_sample_weighted_average_of_its_children(
    broker: RunningBroker, tmp_path: Path, dtype: str
) -> None:
    task = TinyTask()
    init = task.init_params(0)
    deadline = {"deadline_s": 10.0}
    nodes = [_node(broker, tmp_path, "cloud", min_updates=2, train=deadline, **PLAIN)]
    nodes += [
        _node(
            broker, tmp_path, gw, min_updates=len(kids), sync_every=2, update_codec="f32", **PLAIN
        )
        for gw, kids in FLEET.items()
    ]
    sent: dict[tuple[str, int], Params] = {}  # what the gateway gets, after dequantization

    async def play_round(h: Any, gw: str, r: int, base: int) -> None:
        for i, (dev, n) in enumerate(FLEET[gw].items()):
            delta = delta_of(10 * r + i + (100 if gw == "gw2" else 0))
            if dtype == "u8":
                delta = decode_params(encode_params(delta))
            sent[(dev, r)] = delta
            await h.send(gw, make_update(dev, r, delta, base=base, n=n, round=r, codec=dtype))

    async with harness(broker.url) as h:
        for gw, kids in FLEET.items():
            for dev in kids:
                await h.status(gw, dev)
        async with serving(nodes, task):
            gateway_models: dict[str, Params] = {}
            for gw, kids in FLEET.items():
                await h.wait_model(gw, 0)
                await play_round(h, gw, 0, base=0)
                first = params_of(await h.wait_model(gw, 1))
                weights = {dev: float(n) for dev, n in kids.items()}
                want = {
                    n: init[n] + _mean({d: sent[(d, 0)] for d in kids}, weights)[n] for n in init
                }
                assert _close(first, want) < 1e-5
                # Second local round: the gateway syncs its model with the cloud.
                await play_round(h, gw, 1, base=1)
                gateway_models[gw] = {
                    n: first[n] + _mean({d: sent[(d, 1)] for d in kids}, weights)[n] for n in init
                }
            cloud = params_of(await h.wait_model("cloud", 1))
            samples = {gw: 2.0 * sum(kids.values()) for gw, kids in FLEET.items()}
            assert _close(cloud, _mean(gateway_models, samples)) < 1e-5
            for gw in FLEET:  # each gateway adopts the cloud's model and goes on from it
                adopted = await h.wait_model(gw, 3)
                assert adopted.round == 2 and _close(params_of(adopted), cloud) < 1e-6
            m = await h.wait_metrics("cloud", event="round", version=1)
            assert (m["participants"], m["samples"]) == (2, sum(samples.values()))


class _Mains:
    """A mains-powered board on ethernet: always eligible."""

    def read(self) -> Reading:
        return Reading(battery=None, charging=True, link="ethernet")


async def test_devices_gateways_and_cloud_learn_digits(
    broker: RunningBroker, tmp_path: Path
) -> None:
    from edgefl.tasks.digits import DigitsTask

    task = DigitsTask(model="mlp", partition="iid", seed=0)
    train = {"epochs": 2, "lr": 0.1, "momentum": 0.9, "batch_size": 16, "deadline_s": 20.0}
    nodes = [_node(broker, tmp_path, "cloud", min_updates=2, train=train)]
    nodes += [_node(broker, tmp_path, gw, min_updates=3, train=train) for gw in ("gw1", "gw2")]
    devices = [
        DeviceSettings(
            id=f"dev{i}",
            gateway="gw1" if i < 3 else "gw2",
            shard=i,
            num_shards=6,
            mqtt={"broker": broker.url},
            state_dir=tmp_path / "devices",
            compute="cpu",
        )
        for i in range(6)
    ]
    async with harness(broker.url) as h, contextlib.AsyncExitStack() as stack:
        agents = [
            await stack.enter_async_context(DeviceAgent(s, task, reader=_Mains())) for s in devices
        ]
        device_tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            async with serving(nodes, task):
                best = await h.wait_for(
                    lambda: next(
                        (
                            m
                            for m in h.metrics
                            if m["id"] == "cloud" and (m.get("accuracy") or 0) >= 0.85
                        ),
                        None,
                    ),
                    timeout=60,
                )
        finally:
            for t in device_tasks:
                t.cancel()
            await asyncio.gather(*device_tasks, return_exceptions=True)
    assert best["accuracy"] >= 0.85
    assert best["round"] <= 8 and best["participants"] == 2
