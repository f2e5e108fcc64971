"""What does simulating a fleet over MQTT cost, and how far does it scale?

Overhead: ``edgefl simulate`` on simulators/default.toml end to end (a
subprocess: broker, worker processes, every device with its own MQTT session,
report and plots) against an in-process sequential loop doing exactly the same
training: the same devices, partition, local epochs, rounds, seeds, uint8
deltas with error feedback and gateway syncs, with no MQTT. The loop also runs
as a subprocess, so both pay for starting Python and importing torch.
Reference: the loop. Target: the simulator takes at most 1.0x the loop's time
(it trains on every core).

Scale: simulators/large.toml (1,000 devices, one MQTT session each) for 3 cloud
rounds: wall time per round, peak memory of the simulator and its workers
(RSS summed, and PSS, which counts pages the forked workers share once), and
memory per device: the difference to the same processes running 10 devices,
divided by the 990 extra. Target: at most 2 MB per device.

Bandwidth: the default scenario with uint8 and with float32 updates: bytes up
per cloud round at each tier, and the final accuracy, side by side.

Run: python bench/bench_sim.py [--only overhead,scale,bandwidth]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD_TARGET = 1.0
MB_PER_DEVICE_TARGET = 2.0


# -------------------------------------------------------------- the loop


def sequential_loop(name: str) -> dict[str, Any]:
    """The default scenario's training, device after device, in this process: no MQTT."""
    from edgefl.aggregator.sync import ParentSync
    from edgefl.codecs import ErrorFeedback
    from edgefl.fedavg import StreamingAverage
    from edgefl.params import add
    from edgefl.simulator.scenario_file import load_scenario
    from edgefl.tasks import load_task, set_torch_threads
    from edgefl.wire import TrainConfig

    set_torch_threads(1)
    s = load_scenario(name)
    task = load_task(s.task.name, **s.task.task_options(s.seed))
    plans = s.devices()
    state = Path(".")
    devices = [
        (
            plan,
            s.device_settings(plan, broker="127.0.0.1:1", state_dir=state).seed,
            task.device_data(plan.shard, plan.num_shards),
            ErrorFeedback(),
        )
        for plan in plans
    ]
    gateway = s.gateway_settings(0, [], broker="127.0.0.1:1", state_dir=state)
    cfg = TrainConfig(**{**gateway.train.model_dump(), "deadline_s": 1.0})
    params = task.init_params(s.seed)
    syncs = {g: ParentSync(reference=dict(params), parent_version=0) for g in s.gateway_ids()}
    models = {g: params for g in s.gateway_ids()}
    history = []
    for cloud_round in range(s.rounds):
        cloud = StreamingAverage()
        for gid in s.gateway_ids():
            sync = syncs[gid]
            local = sync.adopt(params, models[gid], cloud_round)
            for k in range(gateway.sync_every):
                number = cloud_round * gateway.sync_every + k
                average = StreamingAverage()
                for plan, seed, data, feedback in devices:
                    if plan.gateway != gid:
                        continue
                    seed_r = (seed * 1_000_003 + number) % 2**31
                    result = task.train(local, data, cfg, seed=seed_r)
                    average.add_quantized(feedback.encode(result.delta), result.n)
                    sync.samples_since_sync += result.n
                local = add(local, average.result())
                sync.rounds_since_sync += 1
            update = sync.build(local, sender=gid, seq=cloud_round, round=number)
            sync.sent(local)
            models[gid] = local
            cloud.add_quantized(update.tensors, update.n)
        params = add(params, cloud.result())
        history.append(task.evaluate(params)["accuracy"])
    return {"accuracy": history[-1], "history": history}


# ------------------------------------------------------------- measuring


class TreeMemory:
    """Peak RSS and PSS summed over a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.every_s)


def timed(cmd: list[str], memory: bool = False) -> tuple[float, TreeMemory | None, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    meter = TreeMemory(proc.pid) if memory else None
    if meter:
        meter.__enter__()
    out, _ = proc.communicate()
    elapsed = time.perf_counter() - start
    if meter:
        meter.__exit__(None, None, None)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return elapsed, meter, out


def simulate(scenario: str, out: Path, *extra: str, memory: bool = False) -> tuple[Any, ...]:
    cmd = [sys.executable, "-m", "edgefl.cli", "simulate", scenario, "--plain", "--out", str(out)]
    elapsed, meter, _ = timed([*cmd, *extra], memory=memory)
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "history.json").read_text())
    return elapsed, meter, summary, rows


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------- benches


def bench_overhead(tmp: Path) -> bool:
    loop_s, _, out = timed([sys.executable, __file__, "--loop", "default"])
    loop = json.loads(out.strip().splitlines()[-1])
    sim_s, _, summary, rows = simulate("default", tmp / "overhead")
    ratio = sim_s / loop_s
    per_round = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / max(1, len(rows) - 1)
    print("overhead: simulators/default.toml end to end vs the same training in a loop")
    print(f"  sequential loop (reference)   {loop_s:7.1f} s   accuracy {loop['accuracy']:.4f}")
    print(
        f"  edgefl simulate               {sim_s:7.1f} s   accuracy {summary['final_accuracy']:.4f}"
        f"   ({summary['devices']} devices, {summary['workers']} workers, {summary['broker']},"
        f" {per_round:.2f} s per cloud round after the first)"
    )
    ok = ratio <= OVERHEAD_TARGET
    target = f"target <= {OVERHEAD_TARGET:.1f}x"
    print(f"  ratio simulate / loop         {ratio:7.2f}x  {target}  {verdict(ok)}")
    return ok


def bench_scale(tmp: Path) -> bool:
    big_s, big_mem, big, rows = simulate("large", tmp / "large", memory=True)
    _, small_mem, small, _ = simulate("large", tmp / "large-10", "--devices", "1", memory=True)
    assert big_mem is not None and small_mem is not None
    extra = big["devices"] - small["devices"]
    per_rss = (big_mem.peak_rss - small_mem.peak_rss) / extra / 2**20
    per_pss = (big_mem.peak_pss - small_mem.peak_pss) / extra / 2**20
    times = [r["elapsed_s"] for r in rows]
    rounds = [b - a for a, b in zip([0.0, *times[:-1]], times, strict=True)]
    print(f"scale: simulators/large.toml, {big['devices']} devices with their own MQTT session")
    print(
        f"  {big['rounds']} cloud rounds in {big_s:.1f} s end to end; per round "
        + ", ".join(f"{t:.1f} s" for t in rounds)
        + f" (round 1 counts from the start); accuracy {big['final_accuracy']:.4f}"
    )
    mb = 2**20
    print(
        f"  peak memory, simulator + {big['workers']} workers: RSS {big_mem.peak_rss / mb:.0f} MB,"
        f" PSS {big_mem.peak_pss / mb:.0f} MB; with {small['devices']} devices (reference):"
        f" RSS {small_mem.peak_rss / mb:.0f} MB, PSS {small_mem.peak_pss / mb:.0f} MB"
    )
    ok = per_pss <= MB_PER_DEVICE_TARGET
    print(
        f"  memory per device beyond the shared data: {per_pss:.2f} MB (PSS),"
        f" {per_rss:.2f} MB (RSS)   target <= {MB_PER_DEVICE_TARGET:.1f} MB  {verdict(ok)}"
    )
    return ok


def bench_bandwidth(tmp: Path) -> bool:
    from edgefl.simulator.fleet import run_simulation
    from edgefl.simulator.scenario_file import load_scenario

    results = {}
    for dtype in ("u8", "f32"):
        scenario = load_scenario(
            "default", **{"device.update_codec": dtype, "gateway.update_codec": dtype}
        )
        results[dtype] = run_simulation(scenario, out=tmp / f"bw-{dtype}", quiet=True).summary
    print("bandwidth: simulators/default.toml with uint8 vs float32 updates, per cloud round")
    print(f"  {'':8} {'device->gateway':>16} {'gateway->cloud':>15} {'accuracy':>9}")
    for dtype, s in results.items():
        n = max(1, s["rounds"])
        up_device = s["bytes_up_device"] / n / 1e3
        up_gateway = s["bytes_up_gateway"] / n / 1e3
        print(f"  {dtype:8} {up_device:13.1f} kB {up_gateway:12.1f} kB {s['final_accuracy']:9.4f}")
    u8, f32 = results["u8"], results["f32"]
    ratio = f32["bytes_up_device"] / max(1, u8["bytes_up_device"])
    gap = u8["final_accuracy"] - f32["final_accuracy"]
    ok = ratio > 3.5 and gap >= -0.01
    print(
        f"  uint8 sends {ratio:.2f}x fewer bytes (reference: float32),"
        f" accuracy {100 * gap:+.2f} points; target > 3.5x, at most 1 point lower  {verdict(ok)}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="overhead,scale,bandwidth")
    parser.add_argument("--loop", metavar="SCENARIO", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        print(json.dumps(sequential_loop(args.loop)))
        return 0
    benches = {"overhead": bench_overhead, "scale": bench_scale, "bandwidth": bench_bandwidth}
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    ok = True
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-") as tmp:
        for name in chosen:
            ok = benches[name](Path(tmp)) and ok
            print(flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
