"""The shipped Node-RED flow, run headless by the real node-red, reads the metrics topics.

A node's Telemetry publishes its records on a real Mosquitto; the flow's
``GET /edgefl/metrics`` must answer them as they were sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from timeouts import within

from edgefl.broker import RunningBroker, free_port
from edgefl.config import MqttSettings
from edgefl.telemetry import Telemetry
from edgefl.topics import Topics
from edgefl.transport import Transport
from edgefl.wire import decode_metrics, encode_metrics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FLOW = REPO / "cloud" / "node-red-flow.json"
#: Where .ci/run installs Node-RED (an ignored folder of the checkout).
PREFIX = REPO / ".node-red"
PINNED = "node-red@4.1.15 node-red-dashboard@3.6.6"
INSTALL = f"apt-get install -y nodejs npm && npm install --prefix .node-red {PINNED}"


def node_red() -> list[str]:
    red = PREFIX / "node_modules" / "node-red" / "red.js"
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None or not red.exists():
        pytest.skip(f"needs Node.js and Node-RED: {INSTALL}")
    return [node, str(red)]


def flow_for(broker: RunningBroker) -> list[dict[str, Any]]:
    """The shipped flow, pointed at this broker, as a user would set it."""
    nodes = json.loads(FLOW.read_text())
    (config,) = [n for n in nodes if n["type"] == "mqtt-broker"]
    config["broker"], config["port"] = "127.0.0.1", str(broker.port)
    return list(nodes)


def settings(user_dir: Path, port: int) -> str:
    return (
        "module.exports = {\n"
        f"  uiHost: '127.0.0.1', uiPort: {port}, userDir: {json.dumps(str(user_dir))},\n"
        "  flowFile: 'flows.json', credentialSecret: false, httpAdminRoot: false,\n"
        "  diagnostics: {enabled: false}, logging: {console: {level: 'warn'}},\n"
        "};\n"
    )


def latest(port: int) -> dict[str, Any]:
    try:
        url = f"http://127.0.0.1:{port}/edgefl/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            return dict(json.loads(response.read()))
    except (OSError, urllib.error.URLError, ValueError):
        return {}  # not up yet


async def test_the_node_red_flow_receives_every_nodes_metrics(
    broker: RunningBroker, tmp_path: Path
) -> None:
    argv = node_red()
    (tmp_path / "flows.json").write_text(json.dumps(flow_for(broker)))
    (tmp_path / "settings.js").write_text(settings(tmp_path, port := free_port()))
    proc = await asyncio.create_subprocess_exec(
        *argv, "--settings", str(tmp_path / "settings.js"),
        stdout=subprocess.DEVNULL, env={**os.environ, "NODE_RED_HOME": str(tmp_path)},
    )  # fmt: skip
    records = {
        ("cloud", "cloud"): {"event": "round", "round": 4, "version": 5, "participants": 1,
                             "selected": 1, "accuracy": 0.9375, "loss": 0.25},
        ("gateway", "gw-1"): {"event": "round", "round": 9, "version": 10, "participants": 2,
                              "selected": 3, "bytes_in": 4096, "rejected_stale": 1},
        ("device", "dev-1"): {"event": "declined", "round": 9, "reason": "battery_low"},
    }  # fmt: skip
    transport = Transport(MqttSettings(broker=broker.url), "node-red-test")
    try:
        async with transport:
            senders = [
                Telemetry(transport, Topics(), role=role, sender=node, parent=None)
                for role, node in records
            ]
            got: dict[str, Any] = {}
            async with within(60):
                # QoS 0, and the flow subscribes once it has started (and this
                # session once it is up): send until it shows.
                while len(got) < len(records):
                    for telemetry, fields in zip(senders, records.values(), strict=True):
                        await telemetry.metrics(fields)
                    await asyncio.sleep(0.5)
                    got = await asyncio.to_thread(latest, port)
    finally:
        proc.terminate()
        async with within(20):
            await proc.wait()

    assert set(got) == {f"{role}/{node}" for role, node in records}
    for (role, node), fields in records.items():
        record = got[f"{role}/{node}"]
        expected = decode_metrics(encode_metrics(role, node, fields))
        assert {k: v for k, v in record.items() if k != "ts"} == {
            k: v for k, v in expected.items() if k != "ts"
        }
        assert isinstance(record["ts"], float)
