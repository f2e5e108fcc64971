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
after 10 MLP rounds, beside a bare `python -c "import torch"` and beside a bare
PyTorch loop training the same MLP on the same data (no edgefl). Targets: the
device <= the bare loop + 20 MiB; stretch <= `import torch` + 60 MiB. Then the
training path's RSS stage by stage (torch threads, MALLOC_ARENA_MAX, malloc_trim),
and a deep MLP round planned against 64 MiB of free memory beside one uncapped:
the micro-batch, checkpointing and peak memory each chose, and the same loss (1%).

Run: python bench/bench_device.py [--rounds 5] [--memory-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from edgefl.tasks import digits, load_task, set_torch_threads
from edgefl.topics import Topics
from edgefl.transport import Transport

EPOCHS = 5
MAX_OVERHEAD = 0.10  # non-training share of a CNN round at the default data
MAX_OVER_BARE_MIB = 20.0  # edgefl device beyond the bare PyTorch loop, same model and data
MAX_OVER_TORCH_MIB = 60.0  # the stretch: beyond a bare `import torch`
RSS_ROUNDS = 10
CAP_MIB = 64.0
DEEP_DEPTH, DEEP_WIDTH, DEEP_BATCH = 32, 256, 256
DIGITS = Path(digits.__file__).resolve().parent.parent / "data" / "digits.npz"
GW = "gw-bench"
TOPICS = Topics()
CASES = (("cnn", 1), ("cnn", 10), ("mlp", 1), ("mlp", 10))  # (model, num_shards)


async def _publish(harness: Transport, params: Any, r: int) -> None:
    """A node's round ``r``: the whole model of version ``r``, then its announcement."""
    config = wire.TrainConfig(epochs=EPOCHS, batch_size=32, lr=0.05)
    model = wire.Model(sender=GW, version=r, tensors=wire.model_tensors(params))
    ann = wire.Announcement(
        sender=GW, version=r, round=r, config=config, deadline=time.time() + 300
    )
    await harness.publish(TOPICS.model(GW), wire.encode_model(model), retain=True)
    await harness.publish(TOPICS.round(GW), wire.encode_announcement(ann), retain=True)


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
                    await _publish(harness, params, r)
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


BARE_LOOP = textwrap.dedent(f"""
    # The reference: the digits MLP trained by a bare PyTorch loop, no edgefl.
    import numpy as np, torch
    from torch import nn
    from torch.nn import functional as F
    torch.set_num_threads(1)
    with np.load({str(DIGITS)!r}) as z:
        x = torch.from_numpy(z["images"]).float() / 16
        y = torch.from_numpy(z["labels"]).long()
    for r in range({RSS_ROUNDS}):
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                              nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range({EPOCHS}):
            for b in torch.split(torch.randperm(len(y)), 32):
                opt.zero_grad()
                F.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
    print("ready", flush=True)
    input()
""")

STAGES = textwrap.dedent(f"""
    # RSS of the device's training path, stage by stage, as JSON.
    import ctypes, json, resource, sys, psutil
    rss = lambda: psutil.Process().memory_info().rss / 2**20
    out = {{"python": rss()}}
    import torch
    out["torch"] = rss()
    import edgefl.device
    from edgefl.tasks import digits, load_task, set_torch_threads
    from edgefl.wire import TrainConfig
    out["edgefl"] = rss()
    set_torch_threads(int(sys.argv[1]))
    task = load_task("digits")
    data, params = task.device_data(0, 1), task.init_params(0)
    out["data"] = rss()
    cfg = TrainConfig(epochs={EPOCHS}, batch_size=32, lr=0.05)
    for r in range({RSS_ROUNDS}):
        task.train(params, data, cfg, seed=r)
        if r == 0:
            out["round 1"] = rss()
    out["round 10"] = rss()
    out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out["trimmed"] = rss()
    print(json.dumps(out))
""")

CAPPED = textwrap.dedent(f"""
    # One round of the deep MLP, planned against sys.argv[1] MiB of free memory ("" none).
    import json, resource, sys, psutil
    from edgefl.tasks import digits, load_task, set_torch_threads
    from edgefl.wire import TrainConfig
    set_torch_threads(1)
    task = load_task("digits", model="deep", depth={DEEP_DEPTH}, width={DEEP_WIDTH})
    data, params = task.device_data(0, 4), task.init_params(0)
    cap = float(sys.argv[1]) if sys.argv[1] else None
    cfg = TrainConfig(epochs=1, batch_size={DEEP_BATCH}, lr=0.01, momentum=0.9)
    before = psutil.Process().memory_info().rss / 2**20
    m = task.train(params, data, cfg, seed=1, free_memory_mb=cap).metrics
    m["peak_growth_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(json.dumps(m))
""")


def _json_of(script: str, *args: str, env: dict[str, str] | None = None) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _agent_rss(broker: RunningBroker) -> float:
    """RSS of an ``edgefl device`` process after it trained ``RSS_ROUNDS`` MLP rounds."""
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
    """Publish an MLP round to the agent process, each after the previous update."""
    params = load_task("digits").init_params(0)
    harness = Transport(MqttSettings(broker=broker.url), "harness-rss")
    await harness.subscribe(TOPICS.updates_of(GW))
    async with harness:
        await harness.wait_connected(10)
        messages = harness.messages()
        for r in range(RSS_ROUNDS):
            await _publish(harness, params, r)
            async with asyncio.timeout(180):
                while wire.decode_update((await anext(messages)).payload).round != r:
                    pass


def _memory_report(torch_rss: float, bare_rss: float, agent_rss: float) -> bool:
    stages = {
        "1 thread": _json_of(STAGES, "1"),
        f"{os.cpu_count()} threads": _json_of(STAGES, str(os.cpu_count() or 1)),
        "1 thread, MALLOC_ARENA_MAX=2": _json_of(STAGES, "1", env={"MALLOC_ARENA_MAX": "2"}),
    }
    print(
        f"resident memory after {RSS_ROUNDS} MLP rounds ({EPOCHS} epochs, batch 32): "
        f"bare `import torch` {torch_rss:.0f} MiB; the bare PyTorch loop {bare_rss:.0f} MiB; "
        f"edgefl device {agent_rss:.0f} MiB"
    )
    names = list(next(iter(stages.values())))
    print(f"{'MiB, the training path':<30} " + " ".join(f"{n:>8}" for n in names))
    for label, row in stages.items():
        print(f"{label:<30} " + " ".join(f"{row[n]:>8.0f}" for n in names))
    print(
        "python: the interpreter; torch: import torch; edgefl: import edgefl.device; data: the "
        "digits task and its data; round 1/10: after that many trainings; peak: the process's "
        "peak; trimmed: after malloc_trim(0)"
    )
    ok_bare = agent_rss <= bare_rss + MAX_OVER_BARE_MIB
    ok_torch = agent_rss <= torch_rss + MAX_OVER_TORCH_MIB
    print(
        f"edgefl device vs the bare loop: {agent_rss - bare_rss:+.0f} MiB "
        f"(target <= +{MAX_OVER_BARE_MIB:.0f})  {_verdict(ok_bare)}; vs `import torch`: "
        f"{agent_rss - torch_rss:+.0f} MiB (stretch <= +{MAX_OVER_TORCH_MIB:.0f})  "
        f"{_verdict(ok_torch)}"
    )
    return ok_bare


def _capped_report() -> bool:
    runs = {"uncapped": _json_of(CAPPED, ""), f"{CAP_MIB:.0f} MiB free": _json_of(CAPPED, "64")}
    print(
        f"deep MLP ({DEEP_DEPTH} blocks of {DEEP_WIDTH}), batch {DEEP_BATCH}, one epoch on a "
        "quarter of the data, one process each"
    )
    print(
        f"{'free memory':<14} {'batch':>5} {'micro':>5} {'accum':>5} {'ckpt':>4} "
        f"{'KiB/sample':>10} {'peak +MiB':>9} {'loss':>8}"
    )
    for label, m in runs.items():
        print(
            f"{label:<14} {m['batch']:>5.0f} {m['micro_batch']:>5.0f} {m['accum']:>5.0f} "
            f"{m['checkpointing']:>4.0f} {m['sample_kb']:>10.1f} {m['peak_growth_mb']:>9.1f} "
            f"{m['loss']:>8.4f}"
        )
    free, capped = runs.values()
    same = abs(capped["loss"] - free["loss"]) <= 0.01 * abs(free["loss"])
    print(
        f"final loss capped vs uncapped: {capped['loss'] / free['loss'] - 1:+.4%} "
        f"(target within 1%)  {_verdict(same)}"
    )
    return same


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per case")
    parser.add_argument("--memory-only", action="store_true", help="only the memory figures")
    args = parser.parse_args(argv)
    set_torch_threads(1)  # as `edgefl device` does by default

    broker = start_mosquitto()
    try:
        commit = _commit_ms()
        cases = () if args.memory_only else CASES
        phases = {case: asyncio.run(_phases(broker, *case, args.rounds)) for case in cases}
        torch_rss = _rss_when_ready(
            [sys.executable, "-c", "import torch; print('ready', flush=True); input()"]
        )
        bare_rss = _rss_when_ready([sys.executable, "-c", BARE_LOOP])
        agent_rss = _agent_rss(broker)
    finally:
        broker.stop()
    ok_share = args.memory_only or _phase_report(phases, commit, args.rounds)
    ok_rss = _memory_report(torch_rss, bare_rss, agent_rss)
    ok_cap = _capped_report()
    return 0 if ok_share and ok_rss and ok_cap else 1


def _phase_report(
    phases: dict[tuple[str, int], dict[str, float]], commit: float, rounds: int
) -> bool:
    print(
        f"device round: digits, {EPOCHS} local epochs, batch 32, 1 torch thread, Mosquitto "
        f"on loopback; median of {rounds} rounds after a warm-up"
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
    return ok_share


if __name__ == "__main__":
    sys.exit(main())
