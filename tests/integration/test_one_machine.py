"""The README's one-machine deployment runs as written: broker, cloud, gateway, devices.

Real processes from the README's lines (only the port and the state directory
are this test's), a real Mosquitto; the test watches the metrics topics with
its own MQTT client until the devices trained and the cloud's version moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
from timeouts import within

from edgefl.broker import free_port, mosquitto_path

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def one_machine_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    after = text.split("To try the deploy kits on one machine", 1)[1]
    block = re.search(r"```bash\n(.*?)```", after, re.S)
    assert block is not None
    return block.group(1).strip().splitlines()


async def _watch(port: int, trained: set[str], versions: list[int]) -> None:
    while True:
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, identifier="one-machine-test") as c:
                await c.subscribe("edgefl/metrics/#")
                async for msg in c.messages:
                    record = json.loads(bytes(msg.payload))  # type: ignore[arg-type]
                    role, node = str(msg.topic).split("/")[2:4]
                    if role == "device" and record.get("event") == "round":
                        trained.add(node)
                    if role == "cloud" and isinstance(record.get("version"), int):
                        versions.append(record["version"])
                    if len(trained) == 3 and versions and max(versions) >= 1:
                        return
        await asyncio.sleep(0.2)  # the broker is not up yet


async def test_the_one_machine_sequence_trains_and_moves_the_cloud_version(
    tmp_path: Path,
) -> None:
    assert mosquitto_path() is not None, "the test runs the README's broker: Mosquitto"
    lines = one_machine_block()
    assert lines[0].split("#")[0].split() == ["P=1883", "S=./edgefl-state"]
    assert lines[-1].startswith("edgefl monitor")  # the operator's view; the test watches
    port = free_port()
    script = "\n".join([f"P={port} S={tmp_path / 'state'}", *lines[1:-1], "wait"])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith("EDGEFL_")}
    log = (tmp_path / "fleet.log").open("wb")
    fleet = subprocess.Popen(
        ["bash", "-c", script], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # one process group: the test stops all of it
    )  # fmt: skip
    trained: set[str] = set()
    versions: list[int] = []
    timed_out = False
    try:
        async with within(60):  # 10-20 s on a loaded 2-core machine
            await _watch(port, trained, versions)
    except TimeoutError:
        timed_out = True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(fleet.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(fleet.wait, 30)
        except subprocess.TimeoutExpired:
            os.killpg(fleet.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "fleet.log").read_text(errors="replace")
    assert not timed_out, f"trained {sorted(trained)}, cloud versions {versions}\n{output[-3000:]}"
    assert trained == {"pi-001", "pi-002", "pi-003"}, output[-2000:]
    assert max(versions) >= 1
    assert "Traceback" not in output, output[-2000:]
