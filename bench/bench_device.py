"""What a device round costs besides training, and what the agent costs in memory.

Against a real Mosquitto (started here on a free port), a harness in the
gateway's place publishes a model per round; one DeviceAgent trains the digits
CNN and MLP for 5 local epochs and answers. From the agent's own round metrics:

- train (the local epochs), quantize (uint8 + error feedback), encode (msgpack,
  inside the outbox transaction), store (the outbox's fsync'd writes, encode
  included) and publish (QoS 1 until PUBACK, then the ack in the outbox), in ms;
- the non-training share of a round: (round - train) / train, where round runs
  from the call into the task to the PUBACK, so everything around the epochs
  (thread hand-off, the task's set-up and loss before training, quantize,
  store, publish) counts against it.

The fixed part of that cost is mostly fsync'd sqlite commits (durability across
power loss), so the latency of one such commit on this disk is printed as the
reference, and rows are shown for a device holding the whole training set (the
default, num_shards = 1) and one holding a tenth of it. Target: <= 10% for the
CNN at the default.

Memory, as subprocesses measured with psutil in the same run: an `edgefl device`
after 3 CNN rounds, beside a bare `python -c "import torch"` and beside the same
3 rounds of training without the agent (task, data and torch alone). Target:
the agent itself (MQTT session, outbox, settings, profiles) adds <= 64 MiB.

Run: python bench/bench_device.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil

from edgefl import wire
from edgefl.broker import RunningBroker, start_mosquitto
from edgefl.config import DeviceSettings, MqttSettings
from edgefl.device import DeviceAgent
from edgefl.outbox import Outbox
from edgefl.tasks import load_task, set_torch_threads
from edgefl.topics import Topics
from edgefl.transport import Transport

EPOCHS = 5
MAX_OVERHEAD = 0.10  # non-training share of a CNN round at the default data
MAX_AGENT_MIB = 64.0  # RSS of the agent beyond the same training without it
RSS_ROUNDS = 3
GW = "gw-bench"
TOPICS = Topics()
CASES = (("cnn", 1), ("cnn", 10), ("mlp", 1), ("mlp", 10))  # (model, num_shards)


def _model(params: Any, r: int) -> bytes:
    config = wire.TrainConfig(epochs=EPOCHS, batch_size=32, lr=0.05)
    tensors = wire.model_tensors(params)
    model = wire.Model(
        sender=GW, version=r, round=r, tensors=tensors, config=config, deadline=time.time() + 300
    )
    return wire.encode_model(model)


async def _phases(broker: RunningBroker, model: str, shards: int, rounds: int) -> dict[str, float]:
    """Median per-round figures of ``rounds`` rounds, after one warm-up round."""
    task = load_task("digits", model=model)
    params = task.init_params(0)
    records: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as state:
        settings = DeviceSettings(
            id=f"bench-{model}-{shards}",
            gateway=GW,
            state_dir=state,
            mqtt={"broker": broker.url},
            num_shards=shards,
            heartbeat_s=60,
        )
        harness = Transport(MqttSettings(broker=broker.url), f"harness-{model}-{shards}")
        await harness.subscribe(TOPICS.metrics("device", settings.id), qos=0)
        async with harness, DeviceAgent(settings, task) as agent:
            await harness.wait_connected(10)
            runner = asyncio.create_task(agent.run())
            collector = asyncio.create_task(_collect(harness, records))
            try:
                for r in range(rounds + 1):
                    await harness.publish(TOPICS.model(GW), _model(params, r), retain=True)
                    async with asyncio.timeout(120):
                        while r not in records:
                            await asyncio.sleep(0.005)
            finally:
                for job in (runner, collector):
                    job.cancel()
                await asyncio.gather(runner, collector, return_exceptions=True)
    measured = [records[r] for r in range(1, rounds + 1)]
    keys = ("train_ms", "task_ms", "quantize_ms", "encode_ms", "store_ms", "upload_ms")
    out = {k: statistics.median(float(m[k]) for m in measured) for k in (*keys, "round_ms")}
    train = [float(m["train_ms"]) for m in measured]
    task = [float(m["task_ms"]) for m in measured]
    total = [float(m["round_ms"]) for m in measured]
    out["setup_ms"] = statistics.median(k - t for k, t in zip(task, train, strict=True))
    out["agent_ms"] = statistics.median(r - k for r, k in zip(total, task, strict=True))
    out["share"] = statistics.median((r - t) / t for r, t in zip(total, train, strict=True))
    out["agent_share"] = statistics.median(
        (r - k) / t for r, k, t in zip(total, task, train, strict=True)
    )
    for key in ("upload_bytes", "compression", "samples"):
        out[key] = float(measured[-1][key])
    return out


async def _collect(harness: Transport, records: dict[int, dict[str, Any]]) -> None:
    async for msg in harness.messages():
        record = wire.decode_metrics(msg.payload)
        if record.get("event") == "round":
            records[int(record["round"])] = record  # type: ignore[arg-type]


def _commit_ms(samples: int = 20) -> float:
    """Median time of one outbox write (an fsync'd sqlite commit) on this disk."""
    with tempfile.TemporaryDirectory() as tmp, Outbox(Path(tmp) / "o.db") as box:
        times = []
        for i in range(samples):
            start = time.perf_counter()
            box.put("t", bytes([i]) * 8192)
            times.append((time.perf_counter() - start) * 1000.0)
        return statistics.median(times)


def _rss_when_ready(cmd: list[str]) -> float:
    """Resident MiB of ``cmd`` once it prints ``ready`` (it then waits on stdin)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "ready":
                break
        time.sleep(0.5)
        return psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        proc.kill()
        proc.wait(30)


TRAINING_ALONE = textwrap.dedent(f"""
    from edgefl.tasks import load_task, set_torch_threads
    from edgefl.wire import TrainConfig
    set_torch_threads(1)
    task = load_task("digits", model="cnn")
    data, params = task.device_data(0, 1), task.init_params(0)
    for _ in range({RSS_ROUNDS}):
        task.train(params, data, TrainConfig(epochs={EPOCHS}, batch_size=32, lr=0.05))
    print("ready", flush=True)
    input()
""")


def _agent_rss(broker: RunningBroker) -> float:
    """RSS of an ``edgefl device`` process after it trained ``RSS_ROUNDS`` CNN rounds."""
    with tempfile.TemporaryDirectory() as state:
        cmd = [
            sys.executable,
            "-m",
            "edgefl.cli",
            "device",
            "--id",
            "bench-rss",
            "--gateway",
            GW,
            "--broker",
            broker.url,
            "--state-dir",
            state,
            "--task-options",
            '{"model": "cnn"}',
            "--heartbeat-s",
            "60",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(_drive(broker))
            time.sleep(0.5)
            return psutil.Process(proc.pid).memory_info().rss / 2**20
        finally:
            proc.terminate()
            proc.wait(30)


async def _drive(broker: RunningBroker) -> None:
    """Publish a CNN model per round to the agent process, each after the previous update."""
    params = load_task("digits", model="cnn").init_params(0)
    harness = Transport(MqttSettings(broker=broker.url), "harness-rss")
    await harness.subscribe(TOPICS.updates_of(GW))
    async with harness:
        await harness.wait_connected(10)
        messages = harness.messages()
        for r in range(RSS_ROUNDS):
            await harness.publish(TOPICS.model(GW), _model(params, r), retain=True)
            async with asyncio.timeout(180):
                while wire.decode_update((await anext(messages)).payload).round != r:
                    pass


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per case")
    args = parser.parse_args(argv)
    set_torch_threads(1)  # as `edgefl device` does by default

    broker = start_mosquitto()
    try:
        commit = _commit_ms()
        phases = {case: asyncio.run(_phases(broker, *case, args.rounds)) for case in CASES}
        torch_rss = _rss_when_ready(
            [sys.executable, "-c", "import torch; print('ready', flush=True); input()"]
        )
        training_rss = _rss_when_ready([sys.executable, "-c", TRAINING_ALONE])
        agent_rss = _agent_rss(broker)
    finally:
        broker.stop()

    print(
        f"device round: digits, {EPOCHS} local epochs, batch 32, 1 torch thread, Mosquitto "
        f"on loopback; median of {args.rounds} rounds after a warm-up"
    )
    print(f"reference: one fsync'd outbox commit on this disk takes {commit:.2f} ms")
    print(
        f"{'model':<5} {'data':>5} {'train':>7} {'set-up':>7} {'quantize':>8} {'encode':>6} "
        f"{'store':>6} {'publish':>7} {'agent':>6} {'round':>7} {'bytes':>6} {'x f32':>5} "
        f"{'agent/train':>11} {'non-train':>9}"
    )
    for (model, shards), p in phases.items():
        data = "all" if shards == 1 else f"1/{shards}"
        print(
            f"{model:<5} {data:>5} {p['train_ms']:>7.1f} {p['setup_ms']:>7.1f} "
            f"{p['quantize_ms']:>8.2f} {p['encode_ms']:>6.2f} {p['store_ms']:>6.2f} "
            f"{p['upload_ms']:>7.2f} {p['agent_ms']:>6.1f} {p['round_ms']:>7.1f} "
            f"{p['upload_bytes']:>6.0f} {p['compression']:>5.2f} {p['agent_share']:>11.1%} "
            f"{p['share']:>9.1%}"
        )
    print(
        "ms. set-up: the task's work around its epochs (mostly the loss-before-training pass);"
        " agent: round minus the task call (thread hand-off, quantize, store, publish);"
        " non-train: (set-up + agent) / train"
    )
    cnn = phases[("cnn", 1)]
    ok_share = cnn["share"] <= MAX_OVERHEAD
    print(
        f"non-training share of a CNN round (all data, {cnn['samples']:.0f} samples): "
        f"{cnn['share']:.1%}, the agent's part {cnn['agent_share']:.1%}  "
        f"(target <= {MAX_OVERHEAD:.0%})  {_verdict(ok_share)}"
    )
    own = agent_rss - training_rss
    ok_rss = own <= MAX_AGENT_MIB
    print(
        f"resident memory: bare `import torch` {torch_rss:.0f} MiB; the same {RSS_ROUNDS} CNN "
        f"trainings without the agent {training_rss:.0f} MiB; edgefl device after "
        f"{RSS_ROUNDS} CNN rounds {agent_rss:.0f} MiB (+{agent_rss - torch_rss:.0f} MiB over "
        f"torch)"
    )
    print(
        f"the agent's own memory: +{own:.0f} MiB over the training alone  "
        f"(target <= +{MAX_AGENT_MIB:.0f} MiB)  {_verdict(ok_rss)}"
    )
    return 0 if ok_share and ok_rss else 1


if __name__ == "__main__":
    sys.exit(main())
