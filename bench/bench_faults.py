"""Every update accounted for under a random fault schedule on a real fleet.

1 cloud, 2 gateways and 8 digits devices (MLP, one epoch, shard i of 8) run as
``edgefl`` processes on one Mosquitto. For ``--minutes`` a seeded schedule kills
(SIGKILL) or stops (SIGTERM) any node or device and restarts it on its state dir,
restarts the broker with or without persistence, or cuts the devices' or a gateway's
link for a few seconds; then the fleet recovers and settles for a few cloud rounds.
From the logs (devices' stored updates, nodes' folded and refused (sender, inc, seq))
and the outboxes (what is still pending) every update stored is folded once, refused,
pending or lost. The same fleet then runs as long without faults, for its pace.

Targets: 0 lost, 0 double-counted, a cloud round within 2 deadlines of the last fault.

Run: python bench/bench_faults.py [--minutes 5] [--seed 1] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from fault_fleet import Run, Shape, Tally, describe, run_fleet

TARGET_DEADLINES = 2.0


def _tally_rows(tally: Tally) -> list[tuple[str, str]]:
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(tally.refused.items()))
    return [
        (f"{tally.what} stored", str(tally.stored)),
        ("  folded once", str(tally.folded_once)),
        ("  refused", f"{sum(tally.refused.values())}" + (f" ({reasons})" if reasons else "")),
        ("  pending", str(tally.pending)),
        ("  lost", str(len(tally.lost))),
        ("  double-counted", str(len(tally.double))),
        ("  folds undone by a crash", str(tally.rolled_back)),
    ]


def _column(run: Run) -> list[tuple[str, str]]:
    rec = run.recovery_s
    recovery = "none" if rec is None else f"{rec:.1f} s ({run.recovery_deadlines:.2f} deadlines)"
    return [
        ("faults injected", str(len(run.faults))),
        *_tally_rows(run.updates),
        *_tally_rows(run.syncs),
        ("processes that died by themselves", str(len(run.crashes))),
        ("recovery after the last fault", recovery if run.faults else "-"),
        ("cloud rounds per minute", f"{run.rounds_per_min:.1f}"),
    ]


def table(faulty: Run, clean: Run, seed: int) -> str:
    left, right = _column(faulty), _column(clean)
    heads = (
        f"faults (seed {seed}, {faulty.seconds / 60:.1f} min)",
        f"fault-free ({clean.seconds / 60:.1f} min)",
    )
    width = max(len(name) for name, _ in left)
    cw = max(len(heads[0]), *(len(v) for _, v in left))
    lines = [f"{'':{width}}  {heads[0]:>{cw}}  {heads[1]}"]
    lines += [f"{n:{width}}  {a:>{cw}}  {b}" for (n, a), (_, b) in zip(left, right, strict=True)]
    return "\n".join(lines)


def verdicts(run: Run) -> list[tuple[bool, str]]:
    lost = len(run.updates.lost) + len(run.syncs.lost)
    double = len(run.updates.double) + len(run.syncs.double)
    rec = run.recovery_deadlines
    return [
        (lost == 0, f"0 lost (updates and syncs): {lost}"),
        (double == 0, f"0 double-counted (updates and syncs): {double}"),
        (
            rec is not None and rec <= TARGET_DEADLINES,
            f"a cloud round within {TARGET_DEADLINES:g} deadlines of the last fault: "
            + ("none" if rec is None else f"{rec:.2f}"),
        ),
    ]


async def bench(minutes: float, seed: int, workdir: Path, shape: Shape) -> bool:
    seconds = minutes * 60
    faulty = await run_fleet(workdir / "faults", seconds, seed=seed, shape=shape)
    clean = await run_fleet(workdir / "clean", seconds, seed=None, shape=shape)
    print(table(faulty, clean, seed))
    print(f"cloud deadline {shape.cloud_deadline_s:g} s, gateway deadline "
          f"{shape.gateway_deadline_s:g} s")  # fmt: skip
    ok = True
    for passed, text in verdicts(faulty):
        print(f"{'PASS' if passed else 'FAIL'} {text}")
        ok = ok and passed
    for line in [*describe(faulty), *describe(clean)]:
        print(line)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="length of each run")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    parser.add_argument("--keep", action="store_true", help="keep the logs and state dirs")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edgefl-bench-faults-"))
    ok = False
    try:
        ok = asyncio.run(bench(args.minutes, args.seed, workdir, Shape()))
    finally:
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs and state dirs in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
