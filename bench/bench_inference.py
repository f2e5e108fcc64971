"""Local predictions, a round's energy and the kits' pace, measured on this CPU.

- Latency of one-row ``agent.predict`` calls (``edgefl.device.inference``) for the
  digits MLP and CNN, float32 and int8 (``quantize_dynamic`` of the Linear layers),
  p50 and p99 in ms, beside the bare module's forward pass measured in the same run
  (the reference: what the swap-safe API adds). Target: p99 < 100 ms.
- Energy of one round by each board's power model: this machine's training time of
  the kits' round (2 local epochs, batch 32, a tenth of the data) and the round's
  bytes (the u8 update up, the float32 model down), beside train time and bytes.
- Rounds per hour with the kits' pacing defaults, beside back-to-back rounds at
  this machine's training time alone (an upper bound of what an unpaced fleet runs).

Run: python bench/bench_inference.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from edgefl.codecs import update_bytes
from edgefl.config import AggregatorSettings, DeviceSettings, InferenceSettings, load_settings
from edgefl.device.inference import Inference
from edgefl.params import load_into
from edgefl.profiles import BOARDS
from edgefl.tasks import load_task, set_torch_threads
from edgefl.wire import Model, TrainConfig, encode_model, model_tensors

REPO = Path(__file__).resolve().parents[1]
TARGET_P99_MS = 100.0


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def latency(model: str, calls: int) -> list[tuple[str, float, float]]:
    task = load_task("digits", model=model)
    params = task.init_params(0)
    rows = task.device_data(0, 1).x[:calls].numpy()
    bare = task.build_model().eval()
    load_into(bare, params)
    out = []
    for name, int8 in (("fp32", False), ("int8", True)):
        inference = Inference(task.build_model, (64,), InferenceSettings(int8=int8))
        inference.load(0, params)
        for row in rows[:50]:  # warm-up
            inference.predict(row)
        times = []
        for i in range(calls):
            start = time.perf_counter()
            inference.predict(rows[i % len(rows)])
            times.append((time.perf_counter() - start) * 1e3)
        out.append((name, *percentiles(times)))
    times = []
    with torch.inference_mode():
        for i in range(calls):
            x = torch.from_numpy(rows[i % len(rows)][None])
            start = time.perf_counter()
            bare(x)
            times.append((time.perf_counter() - start) * 1e3)
    out.append(("bare module (reference)", *percentiles(times)))
    return out


def round_cost(model: str, gateway: AggregatorSettings) -> tuple[float, int, int]:
    """This machine's train time of the kits' round, the update's and the model's bytes."""
    task = load_task("digits", model=model)
    params = task.init_params(0)
    data = task.device_data(0, 10)
    cfg = TrainConfig(**{**gateway.train.model_dump(), "deadline_s": 60.0})
    task.train(params, data, cfg)  # warm-up
    train_ms = statistics.median(
        task.train(params, data, cfg, seed=s).metrics["train_ms"] for s in range(3)
    )
    up = update_bytes(task.spec(), "u8")  # the tensors of the u8 update
    down = len(encode_model(Model(sender="gw", version=0, tensors=model_tensors(params))))
    return train_ms, up, down


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="predict calls per case")
    args = parser.parse_args(argv)
    set_torch_threads(1)
    np.random.seed(0)

    print(f"predict latency, one row, {args.calls} calls, 1 torch thread (target p99 < 100 ms)")
    print(f"{'model':<5} {'case':<24} {'p50 ms':>8} {'p99 ms':>8}")
    worst = 0.0
    for model in ("mlp", "cnn"):
        cases = latency(model, args.calls)
        for name, p50, p99 in cases:
            print(f"{model:<5} {name:<24} {p50:8.3f} {p99:8.3f}")
        fp32, int8 = cases[0], cases[1]
        worst = max(worst, fp32[2], int8[2])
        print(f"{model:<5} {'int8 / fp32 p50':<24} {int8[1] / fp32[1]:8.2f}x")
    verdict = "PASS" if worst < TARGET_P99_MS else "FAIL"
    print(f"worst p99 {worst:.3f} ms, target < {TARGET_P99_MS:.0f} ms: {verdict}")

    gateway = load_settings(AggregatorSettings, REPO / "gateways" / "gateway.toml")
    cloud = load_settings(AggregatorSettings, REPO / "cloud" / "cloud.toml")
    print("\nenergy of one round by the power model (train time measured on this machine)")
    print(
        f"{'model':<5} {'board':<17} {'train ms':>9} {'up B':>7} {'down B':>7} "
        f"{'train J':>8} {'radio J':>8} {'total J':>8}"
    )
    costs = {}
    for model in ("mlp", "cnn"):
        train_ms, up, down = costs[model] = round_cost(model, gateway)
        for board, power in BOARDS.items():
            e = power.round_energy(train_ms / 1e3, up, down)
            print(
                f"{model:<5} {board:<17} {train_ms:9.1f} {up:7d} {down:7d} "
                f"{e.train_j:8.3f} {e.radio_j:8.3f} {e.total_j:8.3f}"
            )

    print("\nrounds per hour with the kits' pacing (reference: back to back, training alone)")
    gw_per_h = 3600 / gateway.min_round_interval_s
    print(
        f"gateway kit  min_round_interval_s {gateway.min_round_interval_s:6.0f} s: "
        f"{gw_per_h:5.1f}/h"
    )
    print(
        f"cloud kit    min_round_interval_s {cloud.min_round_interval_s:6.0f} s: "
        f"{3600 / cloud.min_round_interval_s:5.1f}/h"
    )
    for kit in sorted((REPO / "devices").glob("*.toml")):
        device = load_settings(DeviceSettings, kit)
        cap = device.policy.max_rounds_per_hour
        print(f"{kit.name:<20} max_rounds_per_hour {cap:3d}: trains {min(cap, gw_per_h):5.1f}/h")
    pi = BOARDS["pi4"]
    for model, (train_ms, up, down) in costs.items():
        unpaced = 3600 / (train_ms / 1e3)
        joules = pi.round_energy(train_ms / 1e3, up, down).total_j
        print(
            f"{model}: back to back {unpaced:8.0f} rounds/h ({unpaced / gw_per_h:.0f}x the kits'); "
            f"pi4 energy {joules * gw_per_h:.1f} J/h paced vs {joules * unpaced:.0f} J/h unpaced"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
