"""What one dashboard push costs on a large fleet, beside the monitor's own JSON snapshot.

A FleetState fed with the statuses and round records of 1 cloud, 20 gateways and
1,000 devices (wire payloads, as the topics carry them). The dashboard's event is
``summary()`` encoded as JSON, built once per change (every stream shares it) and
sent at most every 0.5 s while the fleet changes;
the reference is ``edgefl monitor --once --json``'s ``snapshot()`` encoded the
same way, on the same state. Target: a push <= 50 ms (10% of one core at the
0.5 s push interval) and <= 2x the reference.

Run: python bench/bench_dashboard.py [--devices 1000] [--gateways 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from edgefl.dashboard import summary
from edgefl.monitor import FleetState
from edgefl.topics import Topics
from edgefl.wire import Status, encode_metrics, encode_status

TARGET_MS = 50.0
TARGET_RATIO = 2.0
T = Topics()


def fleet(devices: int, gateways: int, rounds: int = 30) -> FleetState:
    state = FleetState()
    reasons = {f"rejected_{r}": 0 for r in ("malformed", "stale", "norm", "bad_signature")}
    counters = {"bytes_up": 10**6, "bytes_down": 4 * 10**6, "round_bytes_up": 10**4}
    for g in range(gateways):
        gw = f"gw-{g}"
        state.apply(T.status("cloud", gw), encode_status(Status(id=gw, role="gateway",
                                                                online=True)))  # fmt: skip
        for r in range(rounds):
            state.apply(T.metrics("gateway", gw), encode_metrics("gateway", gw, {
                "round": r, "version": r + 1, "participants": 40, "selected": 50,
                "bytes_in": 40 * 20_000, "clipped": 1, "clip_bound": 1.5, **reasons,
                **counters}))  # fmt: skip
    for r in range(rounds):
        state.apply(
            T.metrics("cloud", "cloud"),
            encode_metrics(
                "cloud",
                "cloud",
                {
                    "round": r,
                    "version": r + 1,
                    "participants": gateways,
                    "selected": gateways,
                    "accuracy": 0.5 + r / (2 * rounds),
                    "bytes_in": gateways * 20_000,
                    **reasons,
                },
            ),
        )
    for d in range(devices):
        dev, gw = f"dev-{d}", f"gw-{d % gateways}"
        state.apply(
            T.status(gw, dev),
            encode_status(
                Status(
                    id=dev,
                    online=True,
                    battery=0.5,
                    link="wifi",
                    eligible=True,
                    buffered=0,
                    model_version=rounds,
                )
            ),
        )
        state.apply(
            T.metrics("device", dev),
            encode_metrics(
                "device", dev, {"round": rounds, "loss": 0.3, "rounds_trained": rounds, **counters}
            ),
        )
    return state  # fmt: skip


def median_ms(work: Callable[[], Any], repeat: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        size = len(work())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--gateways", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    state = fleet(args.devices, args.gateways)
    # What a change of the state costs: the document is built once per change.
    push, push_bytes = median_ms(
        lambda: json.dumps(summary(state), sort_keys=True).encode(), args.repeat
    )
    ref, ref_bytes = median_ms(
        lambda: json.dumps(state.snapshot(), sort_keys=True).encode(), args.repeat
    )
    ratio = push / ref
    ok = push <= TARGET_MS and ratio <= TARGET_RATIO
    print(f"fleet: 1 cloud, {args.gateways} gateways, {args.devices} devices; "
          f"medians of {args.repeat}")  # fmt: skip
    print(f"dashboard push (summary + JSON): {push:7.2f} ms, {push_bytes / 1e3:7.1f} kB")
    print(f"reference (monitor snapshot):    {ref:7.2f} ms, {ref_bytes / 1e3:7.1f} kB")
    print(f"push {push:.2f} ms (target <= {TARGET_MS:.0f} ms), {ratio:.2f}x the reference "
          f"(target <= {TARGET_RATIO:.1f}x): {'PASS' if ok else 'FAIL'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
