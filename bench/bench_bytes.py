"""Bytes per round, both ways, against float32 FedAvg: the downlink and uplink codecs.

One scenario (digits, Dirichlet(0.5), 40 devices under 4 gateways, 5 local epochs,
every device training every round), run through the real MQTT path (``edgefl
simulate``: Mosquitto, every device its own session) three times with the same
partition and seed:

- ``float32``: float32 updates up, float32 models down (the Flower-equivalent FedAvg);
- ``defaults``: the shipped settings (updates ``auto``: uint8 on these links;
  each version down as a uint8 delta with the node's error feedback);
- ``thin``: the thin-link settings: topk both ways, 10% kept (updates up, and each
  version's delta down, both with error feedback).

Bytes are what the devices and gateways measured (whole PUBLISH packets: header,
topic, properties and payload), per cloud round, both tiers summed. Targets: total
bytes per round <= 0.10x float32's, at a final accuracy within 1 point of it.

``--large``: ``simulators/large.toml`` (1,000 devices, 20 of each gateway's 100
selected per round) as shipped (``whole_model = "u8"``) and with the whole model
exact (the reference): the devices' bytes down against their bytes up. Target:
down <= 2x up.

Run: python bench/bench_bytes.py [--rounds 30] [--large]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgefl.simulator.fleet import run_simulation
from edgefl.simulator.scenario_file import load_scenario

TARGET_RATIO = 0.10
ACCURACY_POINTS = 1.0
LARGE_DOWN_UP = 2.0
LARGE = Path(__file__).resolve().parents[1] / "simulators" / "large.toml"

RUNS: dict[str, dict[str, Any]] = {
    "float32": {
        "device.update_codec": "f32",
        "gateway.update_codec": "f32",
        "gateway.downlink_codec": "f32",
        "cloud.downlink_codec": "f32",
    },
    "defaults": {},
    "thin": {
        "device.update_codec": "topk",
        "gateway.update_codec": "topk",
        "gateway.downlink_codec": "topk",
        "gateway.downlink_fraction": 0.1,
        "cloud.downlink_codec": "topk",
        "cloud.downlink_fraction": 0.1,
    },
}


SCENARIO = """
description = "digits, Dirichlet(0.5), 40 devices under 4 gateways, all training"
seed = 0
time_scale = 20.0

[task]
name = "digits"
options = { model = "mlp" }
partition = "dirichlet"
alpha = 0.5

[fleet]
gateways = 4
devices_per_gateway = 10

[cloud]
quorum = 1.0
train = { deadline_s = 600.0 }

[gateway]
sync_every = 1
quorum = 1.0
train = { epochs = 5, batch_size = 16, lr = 0.05, momentum = 0.9, deadline_s = 60.0 }

[[profiles]]
name = "devices"
mains_powered = 1.0
link = { wifi = 0.7, ethernet = 0.3 }
uplink_kbps = { dist = "lognormal", mean = 4000.0, sigma = 0.5, low = 500.0 }
downlink_kbps = { dist = "lognormal", mean = 20000.0, sigma = 0.5, low = 2000.0 }
latency_ms = { dist = "uniform", low = 5.0, high = 40.0 }
"""


def scenario(rounds: int, overrides: dict[str, Any], where: Path) -> Any:
    path = where / "bytes.toml"
    path.write_text(SCENARIO)
    return load_scenario(path, rounds=rounds, timeout_s=60.0 * rounds, **overrides)


def run(name: str, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        found = scenario(rounds, RUNS[name], Path(out))
        result = run_simulation(found, out=Path(out), quiet=True)
    rows = result.rows
    n = max(1, len(rows))
    up = sum(r["bytes_up_device"] + r["bytes_up_gateway"] for r in rows) / n
    down = sum(r["bytes_down_device"] + r["bytes_down_gateway"] for r in rows) / n
    to90 = next((r["round"] for r in rows if (r.get("accuracy") or 0) >= 0.90), None)
    return {
        "name": name,
        "rounds": len(rows),
        "accuracy": result.summary.get("final_accuracy"),
        "to90": to90,
        "up": up,
        "down": down,
    }


def large() -> int:
    """The devices' bytes down over up in ``large``, whole model exact vs uint8."""
    print(f"{'large':<14} {'accuracy':>8} {'loss':>7} {'down':>9} {'up':>9} {'down/up':>8}")
    ratios = {}
    for name, whole in (("exact", "exact"), ("u8 (shipped)", "u8")):
        with tempfile.TemporaryDirectory() as out:
            found = load_scenario(LARGE, **{"gateway.whole_model": whole})
            s = run_simulation(found, out=Path(out), quiet=True).summary
        down, up = s["device_bytes_down_measured"], s["device_bytes_up_measured"]
        ratios[whole] = down / up
        print(
            f"{name:<14} {s['final_accuracy']:>8.4f} {s['final_loss']:>7.4f} "
            f"{down / 1e6:>7.1f}MB {up / 1e6:>7.1f}MB {down / up:>8.2f}"
        )
    ok = ratios["u8"] <= LARGE_DOWN_UP
    print(
        f"large: down {ratios['u8']:.2f}x up as shipped, {ratios['exact']:.2f}x with the whole "
        f"model exact (target <= {LARGE_DOWN_UP}): {'met' if ok else 'NOT met'}"
    )
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--only", default=",".join(RUNS))
    parser.add_argument("--large", action="store_true", help="the large scenario's down/up")
    args = parser.parse_args()
    if args.large:
        return large()
    results = [run(name, args.rounds) for name in args.only.split(",")]
    ref = next((r for r in results if r["name"] == "float32"), None)
    print(
        f"{'run':<9} {'rounds':>6} {'accuracy':>8} {'to 0.90':>7} {'up/round':>11} "
        f"{'down/round':>11} {'total/f32':>9}"
    )
    for r in results:
        total = r["up"] + r["down"]
        ratio = total / (ref["up"] + ref["down"]) if ref else float("nan")
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        print(
            f"{r['name']:<9} {r['rounds']:>6} {acc:>8} {r['to90'] or '-'!s:>7} "
            f"{r['up'] / 1e3:>9.1f}KB {r['down'] / 1e3:>9.1f}KB {ratio:>9.3f}"
        )
    if ref is None:
        return 0
    ours = next((r for r in results if r["name"] == "thin"), None)
    if ours is None:
        return 0
    ratio = (ours["up"] + ours["down"]) / (ref["up"] + ref["down"])
    points = 100 * ((ours["accuracy"] or 0) - (ref["accuracy"] or 0))
    ok = ratio <= TARGET_RATIO and points >= -ACCURACY_POINTS
    print(
        f"thin: {ratio:.3f}x float32 bytes per round (target <= {TARGET_RATIO}), "
        f"accuracy {points:+.2f} points against float32 (target >= -{ACCURACY_POINTS}): "
        f"{'met' if ok else 'NOT met'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
