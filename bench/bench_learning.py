"""Does hierarchy plus uint8 deltas cost accuracy? Digits, Dirichlet(0.5) over 40 devices.

In process, no MQTT: the same partition, seeds and local training for
(a) centralized training on all the training data (the ceiling),
(b) flat float32 FedAvg over the 40 devices,
(c) hierarchical FedAvg: 40 devices -> 4 gateways (10 each) -> cloud, every
    device and every gateway sending uint8 deltas with error feedback, each
    gateway syncing with the cloud every 2 gateway rounds,
and, to tell the two costs apart, (c') the same hierarchy in float32.

Rounds are counted in device-training rounds (every device trains once, 5
local epochs): hierarchy at 20 cloud rounds has trained 40 device rounds, so it
is compared with flat FedAvg after 40 rounds (equal device work). Flat FedAvg
after 20 rounds (equal cloud round trips) is printed beside it. Centralized is
shown after the same number of passes over each sample (5 epochs per round).

Run: python bench/bench_learning.py [--cloud-rounds 20]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from edgefl import codecs
from edgefl.fedavg import StreamingAverage
from edgefl.params import Params, add, copy, num_parameters, subtract
from edgefl.tasks import set_torch_threads
from edgefl.tasks.digits import DigitsTask
from edgefl.wire import TrainConfig, Update, encode_update

NUM_DEVICES = 40
NUM_GATEWAYS = 4
GATEWAY_ROUNDS = 2  # gateway rounds per cloud round (sync_every)
TARGET_ACCURACY = 0.90
MAX_GAP = 0.01  # uint8 hierarchy may trail flat float32 FedAvg by at most 1 point

Send = Callable[[str, Params], Params]


def device_seed(device_round: int, device: int) -> int:
    """Shuffling seed of one device in one round: identical across the compared runs."""
    return 100_003 * device_round + device


def train_devices(
    task: DigitsTask,
    model: Params,
    devices: list[int],
    device_round: int,
    cfg: TrainConfig,
    send: Send,
) -> Params:
    """One round of ``devices`` training from ``model``: the weighted mean of what arrives."""
    acc = StreamingAverage()
    for dev in devices:
        result = task.train(
            model, task.device_data(dev, NUM_DEVICES), cfg, seed=device_seed(device_round, dev)
        )
        acc.add(send(f"device-{dev}", result.delta), float(result.n))
    return acc.result()


def float32_link(_sender: str, delta: Params) -> Params:
    return delta


class Uint8Link:
    """Every sender quantizes to uint8 and keeps its own error feedback residual."""

    def __init__(self) -> None:
        self.feedback: dict[str, codecs.ErrorFeedback] = {}

    def __call__(self, sender: str, delta: Params) -> Params:
        fb = self.feedback.setdefault(sender, codecs.ErrorFeedback())
        return codecs.decode_params(fb.encode(delta))


def run_central(task: DigitsTask, cfg: TrainConfig, device_rounds: int) -> list[float]:
    """Accuracy after each round's worth of epochs over the whole training set."""
    model = task.init_params(0)
    data = task.all_data()
    out = []
    for r in range(device_rounds):
        model = add(model, task.train(model, data, cfg, seed=device_seed(r, 999)).delta)
        out.append(task.evaluate(model)["accuracy"])
    return out


def run_flat(task: DigitsTask, cfg: TrainConfig, device_rounds: int, send: Send) -> list[float]:
    """Every device reports straight to the cloud each round."""
    model = task.init_params(0)
    out = []
    for r in range(device_rounds):
        model = add(model, train_devices(task, model, list(range(NUM_DEVICES)), r, cfg, send))
        out.append(task.evaluate(model)["accuracy"])
    return out


def run_hierarchical(
    task: DigitsTask, cfg: TrainConfig, cloud_rounds: int, send: Send
) -> list[float]:
    """Gateways average their 10 devices, and sync with the cloud every GATEWAY_ROUNDS."""
    per_gateway = NUM_DEVICES // NUM_GATEWAYS
    groups = [list(range(g * per_gateway, (g + 1) * per_gateway)) for g in range(NUM_GATEWAYS)]
    cloud = task.init_params(0)
    out = []
    for c in range(cloud_rounds):
        acc = StreamingAverage()
        for g, devices in enumerate(groups):
            gateway = copy(cloud)
            for k in range(GATEWAY_ROUNDS):
                device_round = c * GATEWAY_ROUNDS + k
                gateway = add(
                    gateway, train_devices(task, gateway, devices, device_round, cfg, send)
                )
            samples = GATEWAY_ROUNDS * sum(len(task.device_data(d, NUM_DEVICES)) for d in devices)
            acc.add(send(f"gateway-{g}", subtract(gateway, cloud)), float(samples))
        cloud = add(cloud, acc.result())
        out.append(task.evaluate(cloud)["accuracy"])
    return out


def update_bytes(params: Params) -> tuple[int, int]:
    """Encoded Update sizes of one device delta: uint8 and raw float32 tensors."""
    u8 = Update(sender="d", seq=0, round=0, base=0, n=1, tensors=codecs.encode_params(params))
    f32 = Update(
        sender="d", seq=0, round=0, base=0, n=1, tensors=codecs.encode_params(params, "f32")
    )
    return len(encode_update(u8)), len(encode_update(f32))


def first_reaching(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), None)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cloud-rounds", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--seed", type=int, default=0, help="partition seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    set_torch_threads(args.threads)
    task = DigitsTask(model=args.model, partition="dirichlet", alpha=args.alpha, seed=args.seed)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum
    )
    cloud_rounds = args.cloud_rounds
    device_rounds = cloud_rounds * GATEWAY_ROUNDS
    sizes = [len(task.device_data(d, NUM_DEVICES)) for d in range(NUM_DEVICES)]
    params = task.init_params(0)
    u8_bytes, f32_bytes = update_bytes(params)

    print(
        f"digits {args.model} ({num_parameters(params)} parameters), Dirichlet({args.alpha}) "
        f"over {NUM_DEVICES} devices, seed {args.seed}; samples per device "
        f"min {min(sizes)} median {int(np.median(sizes))} max {max(sizes)}"
    )
    print(
        f"{NUM_GATEWAYS} gateways x {NUM_DEVICES // NUM_GATEWAYS} devices, "
        f"{GATEWAY_ROUNDS} gateway rounds per cloud round; local: {args.epochs} epochs, "
        f"SGD lr {args.lr} momentum {args.momentum}, batch {args.batch_size}"
    )
    print(
        f"update size: uint8 {u8_bytes} B vs float32 {f32_bytes} B "
        f"({f32_bytes / u8_bytes:.2f}x smaller)\n"
    )

    timings = {}
    start = time.perf_counter()
    central = run_central(task, cfg, device_rounds)
    timings["central"] = time.perf_counter() - start
    start = time.perf_counter()
    flat = run_flat(task, cfg, device_rounds, float32_link)
    timings["flat f32"] = time.perf_counter() - start
    start = time.perf_counter()
    hier_f32 = run_hierarchical(task, cfg, cloud_rounds, float32_link)
    timings["hier f32"] = time.perf_counter() - start
    start = time.perf_counter()
    hier_u8 = run_hierarchical(task, cfg, cloud_rounds, Uint8Link())
    timings["hier u8"] = time.perf_counter() - start

    print("held-out accuracy (360 test images)")
    print(
        f"{'device rnd':>10} {'cloud rnd':>9} {'central':>8} {'flat f32':>9} "
        f"{'hier f32':>9} {'hier u8+EF':>11}"
    )
    for c in range(cloud_rounds):
        r = (c + 1) * GATEWAY_ROUNDS
        if (c + 1) % 2 and c not in (0, cloud_rounds - 1):
            continue
        print(
            f"{r:>10} {c + 1:>9} {central[r - 1]:>8.4f} {flat[r - 1]:>9.4f} "
            f"{hier_f32[c]:>9.4f} {hier_u8[c]:>11.4f}"
        )

    final_u8, final_flat = hier_u8[-1], flat[-1]
    reached = first_reaching(hier_u8, TARGET_ACCURACY)
    gap_ok = final_u8 >= final_flat - MAX_GAP
    target_ok = reached is not None
    rows = [
        (f"centralized, {device_rounds * args.epochs} epochs", central[-1], "the ceiling"),
        (
            f"flat float32 FedAvg, {cloud_rounds} rounds",
            flat[cloud_rounds - 1],
            "equal cloud round trips",
        ),
        (
            f"flat float32 FedAvg, {device_rounds} rounds",
            final_flat,
            "equal device work: the reference",
        ),
        (f"hierarchical float32, {cloud_rounds} cloud rounds", hier_f32[-1], "hierarchy alone"),
        (f"hierarchical uint8+EF, {cloud_rounds} cloud rounds", final_u8, "the system"),
    ]
    print("\nfinal comparison")
    for label, value, note in rows:
        print(f"  {label:<40} {value:.4f}  ({note})")
    print(
        f"  uint8 hierarchy vs flat float32: {final_u8:.4f} vs {final_flat:.4f}, "
        f"trails by {100 * (final_flat - final_u8):+.2f} points (limit {100 * MAX_GAP:.0f})"
        f"  {verdict(gap_ok)}"
    )
    print(
        f"  uint8 hierarchy reaches {TARGET_ACCURACY:.2f}: "
        f"{'at cloud round ' + str(reached) if reached else 'never'} "
        f"(limit {cloud_rounds})  {verdict(target_ok)}"
    )
    print("  wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return 0 if gap_ok and target_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
