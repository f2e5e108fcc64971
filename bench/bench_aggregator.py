"""Gateway ingest rate against a bare MQTT subscriber, and gateway memory at 10 vs 1,000 updates.

A real Mosquitto (started here). Each receiver first opens a persistent session and
leaves; a separate publisher process then queues N encoded uint8 updates of a
100k-parameter model for every session; each receiver comes back and drains its
queue alone, so what is timed is the receiver, not the publisher:

- ingest: the gateway (receive, decode, validate, fold) vs a plain aiomqtt
  subscriber that only counts the same messages; reference: the bare rate.
  Beside them, what the same numeric work costs outside edgefl: a plain
  subscriber that decodes each update with msgspec and takes its norm and fold
  in torch as the u8 codec does (no checks, ledger or journal): the gateway over
  it is what edgefl's own per-update work costs.
- memory: peak RSS of a gateway process whose round folds 1,000 updates vs one
  whose round folds 10; reference: the 10-update process.

Run: python bench/bench_aggregator.py [--updates 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiomqtt
import msgspec
import numpy as np
import torch

from edgefl.aggregator import Aggregator
from edgefl.broker import start_mosquitto
from edgefl.codecs import encode_params
from edgefl.codecs.base import TORCH_FOLD_MIN
from edgefl.config import AggregatorSettings
from edgefl.params import Params, Spec, spec_of
from edgefl.tasks import set_torch_threads
from edgefl.topics import Topics
from edgefl.wire import Update, encode_update

MIN_RATE_RATIO = 0.8  # gateway ingest / bare subscriber
MAX_MEMORY_RATIO = 1.2  # peak RSS, 1,000-update round / 10-update round
SHAPES = {"fc1.weight": (392, 256), "fc1.bias": (392,), "fc2.weight": (10, 392), "fc2.bias": (10,)}
TOPICS = Topics()
BARE_ID = "bench-bare"
WORK_ID = "bench-bare-work"
INGEST = "gw-ingest"  # the gateway whose updates the bare subscriber counts too


class BenchTask:
    """A 104,674-parameter model and nothing else: the gateway never trains."""

    name = "bench"

    def init_params(self, seed: int = 0) -> Params:
        rng = np.random.default_rng(seed)
        return {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in SHAPES.items()}

    def spec(self) -> Spec:
        return spec_of(self.init_params())

    def device_data(self, shard: int, num_shards: int) -> Any:
        raise NotImplementedError

    def train(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def evaluate(self, params: Params, data: Any = None) -> None:
        return None


def _senders(count: int) -> list[str]:
    return [f"dev-{i}" for i in range(count)]


def _settings(broker: str, gateway: str, updates: int, state: str) -> AggregatorSettings:
    return AggregatorSettings(
        id=gateway,
        role="gateway",
        parent="cloud",
        mqtt={"broker": broker},
        state_dir=state,
        children=_senders(updates),  # an allow-list: no status traffic in the way
        min_updates=updates,  # the round closes on the last update
        rounds=1,
        train={"deadline_s": 600.0},
        metrics=False,
    )


# ------------------------------------------------------------------ processes
async def register(broker: str, gateway: str, state: str, bare: bool) -> None:
    """Open the gateway's (and the bare subscriber's) persistent session, then leave."""
    async with Aggregator(_settings(broker, gateway, 1, state), BenchTask()) as node:
        await node.transport.wait_connected(30)
    if bare:
        host, _, port = broker.rpartition(":")
        for client_id in (BARE_ID, WORK_ID):
            async with aiomqtt.Client(
                host, int(port), identifier=client_id, clean_session=False
            ) as c:
                await c.subscribe(TOPICS.updates_of(gateway), qos=1)  # the same messages


async def publish(broker: str, plan: dict[str, int]) -> None:
    """Queue ``plan[gateway]`` distinct updates on each gateway's update topics, QoS 1."""
    rng = np.random.default_rng(1)
    host, _, port = broker.rpartition(":")
    async with aiomqtt.Client(host, int(port), identifier="bench-publisher") as client:
        for gateway, count in plan.items():
            for start in range(0, count, 100):
                batch = []
                for sender in _senders(count)[start : start + 100]:
                    delta = {
                        k: rng.normal(0, 0.01, v).astype(np.float32) for k, v in SHAPES.items()
                    }
                    update = Update(
                        sender=sender, seq=0, round=0, base=0, n=32, tensors=encode_params(delta)
                    )
                    topic = TOPICS.update(gateway, sender)
                    batch.append(client.publish(topic, encode_update(update), qos=1))
                await asyncio.gather(*batch)


async def drain_gateway(broker: str, gateway: str, updates: int, state: str) -> dict[str, Any]:
    """Resume the gateway's session and time it folding its queued updates."""
    times: list[float] = []
    settings = _settings(broker, gateway, updates, state)
    set_torch_threads(settings.torch_threads)  # as `edgefl gateway` does
    async with Aggregator(settings, BenchTask()) as node:
        on_update = node.receive.on_update  # instrumented: the wall time of the first and last fold

        def timed(sender: str, payload: bytes) -> None:
            on_update(sender, payload)
            times.append(time.perf_counter())

        node.receive.on_update = timed  # type: ignore[method-assign]
        await asyncio.wait_for(node.run(), 600)
        folded = node.aggregations and node.last_metrics.get("updates")
        rejected = sum(node.rejected.counts.values())
        receive_ms = float(node.last_metrics.get("fold_ms") or 0.0)
    return {
        "rate": (len(times) - 1) / (times[-1] - times[0]),
        "folded": folded,
        "rejected": rejected,
        "receive_us": receive_ms * 1e3 / max(1, updates),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _numeric_work() -> Any:
    """The norm and fold of one u8 update as the codec computes them, with no edgefl:
    large tensors widened once in torch, small ones in numpy."""
    set_torch_threads(1)
    sizes = {n: math.prod(s) for n, s in SHAPES.items()}
    wide = {n: torch.empty(k) for n, k in sizes.items()}
    acc = {n: np.zeros(k, np.float32) for n, k in sizes.items()}
    view = {n: torch.from_numpy(a) for n, a in acc.items()}
    norms: list[float] = []

    def work(payload: bytes) -> None:
        total = 0.0
        for t in msgspec.msgpack.decode(payload)["tensors"]:
            name, lo, sc = t["name"], t["lo"], t["scale"]
            if sizes[name] >= TORCH_FOLD_MIN:
                buf = wide[name]
                buf.copy_(torch.frombuffer(t["q"], dtype=torch.uint8))
                s1, s2 = float(buf.sum()), float(buf.dot(buf))
                view[name].add_(buf, alpha=sc)
            else:
                a = np.frombuffer(t["q"], np.uint8).astype(np.float32)
                s1, s2 = float(a.sum()), float(a @ a)
                acc[name] += a * np.float32(sc)
            total += sizes[name] * lo * lo + 2.0 * lo * sc * s1 + sc * sc * s2
        norms.append(math.sqrt(total))

    return work


async def drain_bare(broker: str, count: int, work: bool = False) -> dict[str, Any]:
    """Resume a bare subscriber's session and count its queued messages; with ``work``,
    also decode, measure and fold each as the gateway must."""
    host, _, port = broker.rpartition(":")
    seen, first = 0, 0.0
    client_id, per_message = (WORK_ID, _numeric_work()) if work else (BARE_ID, None)
    async with aiomqtt.Client(host, int(port), identifier=client_id, clean_session=False) as c:
        async for message in c.messages:
            if per_message is not None:
                assert isinstance(message.payload, bytes)
                per_message(message.payload)
            seen += 1
            if seen == 1:
                first = time.perf_counter()
            if seen == count:
                last = time.perf_counter()
                assert isinstance(message.payload, bytes)
                break
    return {"rate": (count - 1) / (last - first), "folded": count}


def _child(*args: str) -> dict[str, Any]:
    """Run one role of this script in a fresh process; its last stdout line is JSON."""
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1] or "{}"))


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=2000, help="updates for the ingest rate")
    parser.add_argument("--trials", type=int, default=5, help="ingest runs of each receiver")
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--gateway", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return _role(args)

    n, small, large, trials = args.updates, args.small, args.large, args.trials
    params = sum(math.prod(s) for s in SHAPES.values())
    ingest = [f"{INGEST}-{t}" for t in range(trials)]
    with start_mosquitto() as broker, tempfile.TemporaryDirectory() as state:

        def run(role: str, *extra: str) -> dict[str, Any]:
            return _child("--role", role, "--broker", broker.url, "--state", state, *extra)

        for gateway in [*ingest, "gw-small", "gw-large"]:
            run("register", "--gateway", gateway)
        started = time.perf_counter()
        run("publish", "--plan", json.dumps({"gw-small": small, "gw-large": large}))
        mem_small = run("gateway", "--gateway", "gw-small", "--count", str(small))
        mem_large = run("gateway", "--gateway", "gw-large", "--count", str(large))
        # Trials of the same N updates, queued for both receivers and drained one after
        # the other, in alternating order; the best run of each receiver is the one least
        # disturbed by whatever else the machine ran.
        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "gateway": [], "bare-work": []}
        for t, gateway in enumerate(ingest):
            run("publish", "--plan", json.dumps({gateway: n}))
            order = list(runs) if t % 2 == 0 else list(reversed(runs))
            for role in order:
                runs[role].append(run(role, "--gateway", gateway, "--count", str(n)))
        bare_runs, gw_runs, work_runs = runs["bare"], runs["gateway"], runs["bare-work"]
        elapsed = time.perf_counter() - started

    bare = max(bare_runs, key=lambda r: r["rate"])
    gw = max(gw_runs, key=lambda r: r["rate"])
    work = max(work_runs, key=lambda r: r["rate"])
    rate_ratio = gw["rate"] / bare["rate"]
    mem_ratio = mem_large["peak_rss_mb"] / mem_small["peak_rss_mb"]
    per_trial = ", ".join(
        f"{g['rate'] / b['rate']:.2f}" for g, b in zip(gw_runs, bare_runs, strict=True)
    )
    rate_ok, mem_ok = rate_ratio >= MIN_RATE_RATIO, mem_ratio <= MAX_MEMORY_RATIO
    print(
        f"edgefl aggregator bench: {params:,}-parameter model, uint8 updates of "
        f"~{params / 1024:.0f} KiB; {trials} trials of {n:,} updates, {elapsed:.0f} s",
        f"ingest   gateway (receive+decode+validate+fold): {gw['rate']:8.0f} updates/s "
        f"({gw['folded']} folded, {gw['rejected']} rejected)",
        f"         bare aiomqtt subscriber (count only):   {bare['rate']:8.0f} updates/s",
        f"         per update: {1e6 / bare['rate']:.0f} us of MQTT receive (bare), plus "
        f"{gw['receive_us']:.0f} us of decode, checks and fold at the gateway",
        f"         best over best {rate_ratio:.2f} (target >= {MIN_RATE_RATIO})  "
        f"{_verdict(rate_ok)}; trial by trial: {per_trial}",
        f"         bare + the same decode, norm and fold:  {work['rate']:8.0f} updates/s "
        f"(msgspec and torch, no checks): gateway over it {gw['rate'] / work['rate']:.2f}",
        f"memory   gateway peak RSS, a round of {large:>5} updates: "
        f"{mem_large['peak_rss_mb']:7.1f} MiB ({mem_large['folded']} folded)",
        f"         gateway peak RSS, a round of {small:>5} updates: "
        f"{mem_small['peak_rss_mb']:7.1f} MiB ({mem_small['folded']} folded)",
        f"         ratio {mem_ratio:.2f} (target <= {MAX_MEMORY_RATIO})  {_verdict(mem_ok)}",
        sep="\n",
    )
    return 0 if rate_ok and mem_ok else 1


def _role(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {}
    if args.role == "register":
        bare = args.gateway.startswith(INGEST)
        asyncio.run(register(args.broker, args.gateway, args.state, bare))
    elif args.role == "publish":
        asyncio.run(publish(args.broker, json.loads(args.plan)))
    elif args.role in ("bare", "bare-work"):
        result = asyncio.run(drain_bare(args.broker, args.count, work=args.role == "bare-work"))
    elif args.role == "gateway":
        result = asyncio.run(drain_gateway(args.broker, args.gateway, args.count, args.state))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
