"""Predictions from the newest model: whole-model swaps, answers during training, the endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from timeouts import within

from edgefl.config import DeviceSettings, InferenceSettings
from edgefl.device import DeviceAgent
from edgefl.device.inference import BadInput, Inference, NoModel
from edgefl.params import Params, load_into
from edgefl.tasks import load_task, set_torch_threads
from edgefl.topics import Topics
from edgefl.transport import MemoryBroker, MemoryTransport
from edgefl.wire import TrainConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from aggregator_fakes import publish_round

TOPICS = Topics()
TASK = load_task("digits", model="mlp")
X = TASK.device_data(0, 8).x[:16].numpy()


def reference(params: Params) -> np.ndarray:
    module = TASK.build_model()
    load_into(module, params)
    with torch.inference_mode():
        return module.eval()(torch.from_numpy(X)).numpy()


def test_every_prediction_comes_whole_from_one_version_while_versions_swap() -> None:
    sets = [TASK.init_params(0), TASK.init_params(1)]
    want = [reference(p) for p in sets]
    inference = Inference(TASK.build_model, (64,), InferenceSettings())
    with pytest.raises(NoModel):
        inference.predict(X)
    inference.load(0, sets[0])
    seen: list[tuple[int, bool]] = []
    done = threading.Event()

    def ask() -> None:
        while not done.is_set():
            got = inference.predict(X)
            seen.append((got.version, np.array_equal(got.outputs, want[got.version % 2])))

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for t in askers:
        t.start()
    for version in range(1, 40):
        inference.load(version, sets[version % 2])
    done.set()
    for t in askers:
        t.join()
    assert inference.version == 39 and inference.swaps == 40
    assert len({v for v, _ in seen}) > 1  # the askers saw several versions
    assert all(whole for _, whole in seen)


async def test_a_version_that_does_not_load_leaves_the_served_one() -> None:
    inference = Inference(TASK.build_model, (64,), InferenceSettings())
    inference.load(0, TASK.init_params(0))
    serving = asyncio.create_task(inference.run())
    try:
        inference.offer(1, {"net.0.weight": np.zeros((3, 3), np.float32)})
        await until(lambda: inference.failed == 1)
        inference.offer(2, TASK.init_params(1))
        await until(lambda: inference.version == 2)
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    assert inference.swaps == 2


def test_inputs_that_do_not_fit_are_refused() -> None:
    inference = Inference(TASK.build_model, (64,), InferenceSettings(max_batch=4))
    inference.load(0, TASK.init_params(0))
    assert inference.predict(X[0]).outputs.shape == (1, 10)  # one row
    for bad in (X[:, :10], X[:5], np.full((1, 64), np.nan), "pixels"):
        with pytest.raises(BadInput):
            inference.predict(bad)


def test_int8_inference_answers_close_to_float32() -> None:
    params = TASK.init_params(0)
    inference = Inference(TASK.build_model, (64,), InferenceSettings(int8=True))
    inference.load(0, params)
    got = inference.predict(X)
    assert (got.labels == reference(params).argmax(axis=1)).mean() >= 0.8
    assert np.abs(got.outputs - reference(params)).max() < 0.1


class BlockingTask:
    """The digits MLP, whose training waits until the test lets it go."""

    def __init__(self) -> None:
        self.inner = TASK
        self.name = TASK.name
        self.training = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self.training.set()
        self.release.wait(30)
        return self.inner.train(*args, **kwargs)


async def play_round(gw: MemoryTransport, version: int, number: int, params: Params) -> None:
    config = TrainConfig(epochs=1)
    await publish_round(gw, TOPICS, "gw", params, version=version, round=number, config=config)


@contextlib.asynccontextmanager
async def running(agent: DeviceAgent, broker: MemoryBroker) -> Any:
    async with MemoryTransport(broker, "gw-node") as gw, agent:
        runner = asyncio.create_task(agent.run())
        try:
            yield gw
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def until(check: Any) -> None:
    async with within(20):
        while not check():
            await asyncio.sleep(0.01)


async def test_predict_answers_during_training_and_moves_to_a_new_version_whole(
    tmp_path: Path,
) -> None:
    set_torch_threads(1)
    task, broker = BlockingTask(), MemoryBroker()
    # v1 comes as a whole model without a delta: a device takes it at its next status poll.
    settings = DeviceSettings(
        id="dev-1", gateway="gw", state_dir=tmp_path, num_shards=8, heartbeat_s=0.2
    )
    agent = DeviceAgent(settings, task, transport=broker.factory())  # type: ignore[arg-type]
    v0, v1 = TASK.init_params(0), TASK.init_params(1)
    try:
        async with running(agent, broker) as gw:
            await play_round(gw, 0, 0, v0)
            await until(lambda: task.training.is_set() and agent.inference.version == 0)
            during = agent.predict(X)
            await play_round(gw, 1, 1, v1)
            await until(lambda: agent.inference.version == 1)
            after = agent.predict(X)
            assert agent.rounds_trained == 0  # round 0 is still training
            task.release.set()  # before the stop, which would wait for the training thread
    finally:
        task.release.set()
    assert during.version == 0 and np.array_equal(during.outputs, reference(v0))
    assert after.version == 1 and np.array_equal(after.outputs, reference(v1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_the_endpoint_is_off_by_default_and_serves_predictions_when_set(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    off = DeviceAgent(DeviceSettings(id="d0", gateway="gw", state_dir=tmp_path), TASK)
    async with off:
        assert off.endpoint is None and off.settings.inference.port == 0
    port = free_port()
    settings = DeviceSettings(
        id="dev-1", gateway="gw", state_dir=tmp_path, inference={"port": port}
    )
    agent = DeviceAgent(settings, TASK, transport=broker.factory())
    params = TASK.init_params(0)
    async with running(agent, broker) as gw:
        early, _ = await asyncio.to_thread(post, port, json.dumps({"x": X[:2].tolist()}).encode())
        assert early == 503  # no model yet
        await play_round(gw, 0, 0, params)
        await until(lambda: agent.inference.version == 0)
        status, doc = await asyncio.to_thread(
            post, port, json.dumps({"x": X[:2].tolist()}).encode()
        )
        bad, _ = await asyncio.to_thread(post, port, b'{"x": [[1, 2]]}')
    assert status == 200 and doc["version"] == 0
    assert doc["labels"] == reference(params)[:2].argmax(axis=1).tolist()
    np.testing.assert_allclose(doc["outputs"], reference(params)[:2], rtol=1e-5, atol=1e-6)
    assert bad == 400 and agent.endpoint is not None and agent.endpoint.refused[400] == 1
