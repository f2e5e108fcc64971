"""A node killed with SIGKILL mid-round resumes from its checkpoint: same version and round,
its open round replayed from its journal, and an update it had folded is still a duplicate."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefl.broker import RunningBroker

sys.path.insert(0, str(Path(__file__).parent))
from aggregator_fakes import Harness, delta_of, harness, make_update

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent


def _start(
    command: str, node: str, broker: RunningBroker, state: Path, log: Path
) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "edgefl.cli",
        command,
        "--id",
        node,
        "--broker",
        broker.url,
        "--state-dir",
        str(state),
        "--task",
        "aggregator_fakes:TinyTask",
        "--min-updates",
        "2",
        "--train-deadline-s",
        "60",
    ]
    if command == "gateway":
        args += ["--sync-every", "1000"]  # no parent runs here: never wait for one
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


async def _models_of(h: Harness, node: str, version: int, count: int) -> None:
    await h.wait_for(
        lambda: len([m for m in h.models.get(node, []) if m.version == version]) >= count,
        timeout=60,
    )


@pytest.mark.parametrize(("command", "node"), [("gateway", "gw1"), ("cloud", "cloud")])
async def test_killed_node_resumes_at_its_version_and_still_rejects_duplicates(
    broker: RunningBroker, tmp_path: Path, command: str, node: str
) -> None:
    log = tmp_path / "node.log"
    async with harness(broker.url) as h:
        await h.status(node, "c1")
        await h.status(node, "c2")
        proc = _start(command, node, broker, tmp_path, log)
        try:
            await _models_of(h, node, 0, 1)
            await h.send(node, make_update("c1", 0, delta_of(1), base=0))
            await h.send(node, make_update("c2", 0, delta_of(2), base=0))
            await _models_of(h, node, 1, 1)  # round 0 closed and checkpointed
            await h.send(node, make_update("c1", 1, delta_of(3), base=1))  # folded, round open
            await asyncio.sleep(0.3)  # let it fold c1's update before the kill
            assert proc.poll() is None, log.read_text()[-3000:]
            before = h.models[node][-1]
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

            # c1's round-1 update is replayed from the journal; its redelivery, sent while
            # the node is down, waits in the broker session and is taken as one.
            await h.send(node, make_update("c1", 1, delta_of(3), base=1))
            proc = _start(command, node, broker, tmp_path, log)
            await _models_of(h, node, 1, 2)  # the restarted process announces again ...
            after = h.models[node][-1]
            # ... a new round of the same version, the same model: whoever trained
            # round 1 trains again.
            assert (before.version, before.round) == (1, 1)
            assert (after.version, after.round) == (1, 2)
            for name, value in before.params.items():
                np.testing.assert_array_equal(after.params[name], value)
            await h.send(node, make_update("c2", 0, delta_of(2), base=0))  # folded pre-kill
            await h.send(node, make_update("c2", 1, delta_of(4), base=1))
            m = await h.wait_metrics(node, event="round", version=2, timeout=30)
        finally:
            proc.kill()
            proc.wait(timeout=10)
    assert (m["round"], m["participants"], m["redelivered"], m["rejected_total"]) == (
        2,
        2,
        2,
        0,
    ), log.read_text()[-3000:]
