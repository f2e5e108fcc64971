"""A random fault schedule on a real fleet (1 cloud, 2 gateways, 8 digits devices as
``edgefl`` processes): kills, SIGTERMs, broker restarts with and without persistence and
link cuts. Every update a device stored is folded once, refused or still pending, by
(sender, inc, seq), and the cloud completes a round within two deadlines of the last fault.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fault_fleet import Run, Shape, bound_s, describe, run_fleet

pytestmark = pytest.mark.integration
FAULTS_S = 75.0
#: Typically 160 s: 11 interpreters importing torch, the faults, a few rounds, the stop.
#: The timeout is the run's own bound (every wait in it is bounded) plus the accounting.
TIMEOUT_S = int(bound_s(FAULTS_S, Shape())) + 20


def _report(run: Run) -> str:
    rows = [f"{t.what}: {t.row()} refused {dict(t.refused)}" for t in (run.updates, run.syncs)]
    return "\n".join([*rows, f"recovery {run.recovery_s} s", *describe(run), f"logs: {run.logs}"])


@pytest.mark.timeout(TIMEOUT_S)
async def test_random_faults_lose_and_double_count_no_update_and_the_cloud_recovers(
    tmp_path: Path,
) -> None:
    run = await run_fleet(tmp_path, FAULTS_S, seed=61)
    report = _report(run)
    assert len(run.faults) >= 8, report
    assert run.updates.stored > 0 and run.updates.folded_once > 0, report
    assert (len(run.updates.lost), len(run.syncs.lost)) == (0, 0), report
    assert (len(run.updates.double), len(run.syncs.double)) == (0, 0), report
    assert run.recovery_deadlines is not None and run.recovery_deadlines <= 2.0, report
