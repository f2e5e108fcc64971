"""A tiny deterministic task and an MQTT harness that plays a node's children.

The aggregator tests use these to send crafted, exactly known updates over a real
broker and read back models and metrics; no training happens here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiomqtt
import numpy as np
from timeouts import within

from edgefl.aggregator import Aggregator
from edgefl.codecs import encode_params
from edgefl.config import AggregatorSettings
from edgefl.params import Params, Spec, spec_of
from edgefl.signing import sign_model
from edgefl.topics import Topics
from edgefl.wire import (
    Announcement,
    Model,
    Status,
    Update,
    decode_announcement,
    decode_metrics,
    decode_model,
    encode_announcement,
    encode_model,
    encode_status,
    encode_update,
    model_params,
    model_tensors,
)

SHAPES: dict[str, tuple[int, ...]] = {"w": (3, 4), "b": (4,)}


class TinyTask:
    """Two small tensors; ``init_params(seed)`` is the same for the same seed. No data."""

    name = "tiny"

    def __init__(self, **_: Any) -> None:
        pass

    def init_params(self, seed: int = 0) -> Params:
        rng = np.random.default_rng(seed)
        return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}

    def spec(self) -> Spec:
        return spec_of(self.init_params())

    def device_data(self, shard: int, num_shards: int) -> Any:
        raise NotImplementedError("the tiny task has no data")  # pragma: no cover

    def train(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the tiny task is not trained")  # pragma: no cover

    def evaluate(self, params: Params, data: Any = None) -> dict[str, float]:
        return {"accuracy": float(np.tanh(abs(params["b"]).sum())), "loss": 1.0}


def delta_of(seed: int, scale: float = 0.1) -> Params:
    rng = np.random.default_rng(1000 + seed)
    return {n: (scale * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}


def make_update(
    sender: str,
    seq: int,
    delta: Mapping[str, np.ndarray],
    *,
    base: int = 0,
    n: int = 10,
    round: int = 0,
    codec: str = "f32",
) -> Update:
    tensors = encode_params(delta, codec)
    return Update(sender=sender, seq=seq, round=round, base=base, n=n, tensors=tensors)


class Seen:
    """An announcement as a child sees it, with the whole model of its version."""

    def __init__(self, announcement: Announcement, params: Params) -> None:
        self.announcement = announcement
        self.params = params

    def __getattr__(self, name: str) -> Any:
        return getattr(self.announcement, name)


class Harness:
    """One real MQTT client playing children of ``node`` and watching topics."""

    def __init__(self, client: aiomqtt.Client, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        #: per node, every announcement with the model of its version
        self.models: dict[str, list[Seen]] = {}
        self._whole: dict[tuple[str, int], Params] = {}
        self.metrics: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def status(self, node: str, child: str, **fields: Any) -> None:
        status = Status(online=True, id=child, **fields)
        await self.client.publish(
            self.topics.status(node, child), encode_status(status), qos=1, retain=True
        )

    async def send(self, node: str, update: Update, *, topic_sender: str | None = None) -> None:
        await self.raw(node, topic_sender or update.sender, encode_update(update))

    async def raw(self, node: str, sender: str, payload: bytes) -> None:
        await self.client.publish(self.topics.update(node, sender), payload, qos=1)

    async def _listen(self) -> None:
        async for msg in self.client.messages:
            payload = bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""
            parsed = self.topics.parse(msg.topic.value)
            if parsed.kind == "model" and payload:
                model = decode_model(payload)
                self._whole[(parsed.node, model.version)] = model_params(model)
            elif parsed.kind == "round" and payload:
                ann = decode_announcement(payload)
                params = self._whole.get((parsed.node, ann.version), {})
                self.models.setdefault(parsed.node, []).append(Seen(ann, params))
            elif parsed.kind == "metrics":
                self.metrics.append(decode_metrics(payload))
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> Any:
        """Wait until ``predicate()`` returns something truthy; return it."""
        async with within(timeout), self._changed:
            while not (found := predicate()):
                await self._changed.wait()
            return found

    def model(self, node: str, version: int) -> Seen | None:
        return next((m for m in self.models.get(node, []) if m.version == version), None)

    async def wait_model(self, node: str, version: int, timeout: float = 10.0) -> Seen:
        return await self.wait_for(lambda: self.model(node, version), timeout)  # type: ignore[no-any-return]

    def latest_metrics(self, node: str, event: str = "round") -> dict[str, Any] | None:
        found = [m for m in self.metrics if m["id"] == node and m.get("event") == event]
        return found[-1] if found else None

    async def wait_metrics(self, node: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        def hit() -> dict[str, Any] | None:
            for m in reversed(self.metrics):
                if m["id"] == node and all(m.get(k) == v for k, v in match.items()):
                    return m
            return None

        return await self.wait_for(hit, timeout)  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def harness(broker_url: str, prefix: str = "edgefl") -> AsyncIterator[Harness]:
    host, _, port = broker_url.rpartition(":")
    topics = Topics(prefix)
    async with aiomqtt.Client(host, int(port), identifier=f"harness-{time.monotonic_ns()}") as c:
        h = Harness(c, topics)
        await c.subscribe(f"{prefix}/+/model", qos=1)
        await c.subscribe(f"{prefix}/+/round", qos=1)
        await c.subscribe(topics.all_metrics(), qos=1)
        listener = asyncio.create_task(h._listen())
        try:
            yield h
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


def params_of(model: Seen) -> Params:
    return model.params


@contextlib.asynccontextmanager
async def running(settings: AggregatorSettings) -> AsyncIterator[Aggregator]:
    """One aggregation node on the TinyTask, serving for the length of the block."""
    async with Aggregator(settings, TinyTask()) as node:
        task = asyncio.create_task(node.run())
        try:
            yield node
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def node_settings(broker_url: str, state_dir: Any, **kw: Any) -> AggregatorSettings:
    """A cloud-tier node on ``broker_url`` with a short deadline and no evaluation."""
    base: dict[str, Any] = {
        "id": "cloud",
        "role": "cloud",
        "mqtt": {"broker": broker_url},
        "state_dir": state_dir,
        "train": {"deadline_s": 1.0},
        "evaluate": False,
    }
    return AggregatorSettings(**{**base, **kw})


async def publish_round(
    transport: Any,
    topics: Topics,
    node: str,
    params: Params,
    *,
    version: int = 0,
    key: Any = None,
    **announcement: Any,
) -> Announcement:
    """Play a node for its children: the whole model of ``version``, then the round's
    announcement, both retained, as a node publishes them (signed with ``key``)."""
    model = Model(sender=node, version=version, tensors=model_tensors(params))
    ann = Announcement(sender=node, version=version, **{"round": 0, **announcement})
    if key is not None:
        model, ann = sign_model(model, key), sign_model(ann, key)
    await transport.publish(topics.model(node), encode_model(model), retain=True)
    await transport.publish(topics.round(node), encode_announcement(ann), retain=True)
    return ann
