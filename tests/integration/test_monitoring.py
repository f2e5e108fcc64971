"""Monitoring a real run: a cloud, a gateway and two devices training digits on Mosquitto.

What the real ``mosquitto_sub`` prints, what ``edgefl monitor --once`` reports
and what ``--prometheus`` serves must all agree with the metrics topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from readme_tables import table_names
from secure_fleet import serving
from timeouts import within

from edgefl.aggregator import Aggregator
from edgefl.broker import RunningBroker, free_port
from edgefl.config import AggregatorSettings, DeviceSettings, MqttSettings
from edgefl.device import DeviceAgent
from edgefl.profiles import Reading
from edgefl.tasks import Task, load_task
from edgefl.topics import Topics
from edgefl.wire import TrainConfig, decode_status

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
T = Topics()
BATTERY = {"dev-1": 0.9, "dev-2": 0.55}


class FixedReader:
    """A device on battery, on wifi: figures the monitor must show as they are."""

    def __init__(self, battery: float) -> None:
        self.reading = Reading(battery=battery, charging=False, link="wifi")

    def read(self) -> Reading:
        return self.reading


def documented_fields() -> set[str]:
    text = (REPO / "README.md").read_text().split("\n## Operating a fleet", 1)[1]
    text = text.split("\n## ", 1)[0]
    return set(table_names(text))


def is_documented(key: str, documented: set[str]) -> bool:
    if key in documented:
        return True
    head, sep, _ = key.partition("_")
    return f"{head}_<reason>" in documented and bool(sep)


@contextlib.asynccontextmanager
async def fleet(broker: RunningBroker, state_dir: Path, task: Task) -> AsyncIterator[None]:
    """cloud <- gw-1 <- dev-1, dev-2, all in this process, serving until the block ends."""
    mqtt = MqttSettings(broker=broker.url, reconnect_min_s=0.1, reconnect_max_s=1.0)
    train = TrainConfig(epochs=1, batch_size=32, lr=0.1, deadline_s=20)
    nodes = [
        Aggregator(AggregatorSettings(id="cloud", role="cloud", mqtt=mqtt, state_dir=state_dir,
                                      train=train, checkpoint=False), task),
        Aggregator(AggregatorSettings(id="gw-1", role="gateway", mqtt=mqtt, state_dir=state_dir,
                                      train=train, checkpoint=False), task),
    ]  # fmt: skip
    devices = [
        DeviceAgent(device_settings(d, i, mqtt, state_dir), task, reader=FixedReader(BATTERY[d]))
        for i, d in enumerate(BATTERY)
    ]
    async with serving(*nodes, *devices):
        yield


def device_settings(dev: str, shard: int, mqtt: MqttSettings, state_dir: Path) -> DeviceSettings:
    return DeviceSettings(
        id=dev, gateway="gw-1", shard=shard, num_shards=len(BATTERY), mqtt=mqtt,
        state_dir=state_dir, compute="cpu", heartbeat_s=5,
    )  # fmt: skip


class Sub:
    """The real mosquitto_sub, printing ``topic payload`` lines."""

    def __init__(self, broker: RunningBroker) -> None:
        self.broker = broker
        self.records: list[tuple[str, dict[str, Any]]] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.broker.port),
            "-t", "edgefl/metrics/#", "-t", "edgefl/+/status/#", "-v", "-W", "120",
            stdout=subprocess.PIPE,
        )  # fmt: skip

    async def until(self, done: Any, timeout: float) -> None:
        """Read lines until ``done(records)`` holds; every line must be JSON."""
        assert self.proc.stdout is not None
        async with within(timeout):
            while not done(self.records):
                line = (await self.proc.stdout.readline()).decode()
                assert line, "mosquitto_sub ended early"
                topic, _, payload = line.rstrip("\n").partition(" ")
                self.records.append((topic, json.loads(payload)))

    async def drain(self, quiet_s: float = 1.0) -> None:
        with contextlib.suppress(TimeoutError):
            await self.until(lambda _: False, quiet_s)

    def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()

    def rounds(self, role: str, node: str) -> list[dict[str, Any]]:
        topic = T.metrics(role, node)
        return [r for t, r in self.records if t == topic and r.get("event") == "round"]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_every_monitoring_view_agrees_with_the_metrics_topics(
    broker: RunningBroker, tmp_path: Path
) -> None:
    task = load_task("digits", model="mlp")
    sub = Sub(broker)
    await sub.start()
    prom_port = free_port()
    monitor = [sys.executable, "-m", "edgefl.cli", "monitor", "--broker", broker.url]
    exporter = await asyncio.create_subprocess_exec(
        *monitor, "--prometheus", str(prom_port), "--no-view"
    )
    once, once_text = [
        await asyncio.create_subprocess_exec(
            *monitor, "--once", *extra, "--wait", "12", stdout=subprocess.PIPE
        )
        for extra in (["--json"], [])
    ]
    try:
        async with fleet(broker, tmp_path, task):
            await sub.until(lambda _: len(sub.rounds("cloud", "cloud")) >= 3, timeout=90)
            async with within(30):
                (out, _), (text, _) = await asyncio.gather(
                    once.communicate(), once_text.communicate()
                )
        await sub.drain()
        samples = await asyncio.to_thread(scrape, prom_port)
    finally:
        sub.stop()
        for proc in (exporter, once, once_text):
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()

    # mosquitto_sub: every line JSON, with the documented fields only
    documented = documented_fields()
    kinds = {(t.split("/")[1], r.get("role")) for t, r in sub.records}
    assert {("metrics", "cloud"), ("metrics", "gateway"), ("metrics", "device")} <= kinds
    for topic, record in sub.records:
        assert record["schema"] == 1
        undocumented = [k for k in record if not is_documented(k, documented)]
        assert not undocumented, f"{topic}: {undocumented}"
        if "/status/" in topic:
            assert decode_status(json.dumps(record).encode()).id == topic.rsplit("/", 1)[1]
        else:
            assert (record["role"], record["id"]) == tuple(topic.split("/")[2:])
    cloud_rounds, gw_rounds = sub.rounds("cloud", "cloud"), sub.rounds("gateway", "gw-1")
    assert all(0 <= r["accuracy"] <= 1 for r in cloud_rounds)
    assert all(r["rejected_total"] == 0 for r in gw_rounds)
    # The first round may open before the second device's status arrives.
    assert all(r["participants"] == 2 for r in gw_rounds[1:])
    assert cloud_rounds[-1]["accuracy"] > 0.5  # digits learns within a few rounds

    # edgefl monitor --once: the figures of a round the topics carried
    assert once.returncode == 0
    snap = json.loads(out)
    for node, seen in (("cloud", cloud_rounds), ("gw-1", gw_rounds)):
        shown = snap["nodes"][node]
        (record,) = [r for r in seen if r["round"] == shown["round"]]
        for key in ("version", "participants", "samples", "accuracy", "rejected_total"):
            assert shown.get(key) == record.get(key), (node, key)
    history = snap["nodes"]["cloud"]["accuracy_history"]
    upto = [r["accuracy"] for r in cloud_rounds if r["round"] <= snap["nodes"]["cloud"]["round"]]
    assert history and history == upto[-len(history) :]
    # and the same in the terminal view: node, tier, online, children, round, version,
    # participants, accuracy, ...
    assert once_text.returncode == 0
    rows = {
        cells[1].strip(): [c.strip() for c in cells[2:]]
        for cells in (line.split("│") for line in text.decode().splitlines())
        if len(cells) > 2
    }
    shown_round = int(rows["cloud"][3])
    (record,) = [r for r in cloud_rounds if r["round"] == shown_round]
    assert rows["cloud"][4:7] == [str(record["version"]), "1", f"{record['accuracy']:.3f}"]
    assert rows["dev-2"][:4] == ["gw-1", "yes", f"{BATTERY['dev-2'] * 100:.0f}%", "wifi"]
    for dev, battery in BATTERY.items():
        shown = snap["devices"][dev]
        assert (shown["gateway"], shown["online"], shown["battery"]) == ("gw-1", True, battery)
        carried = {r.get("buffered") for t, r in sub.records if t.endswith(f"/{dev}")}
        assert shown["link"] == "wifi" and shown["buffered"] in carried - {None}
        assert shown["last_round"] is not None

    # --prometheus: the last record of each node, after the fleet stopped
    last_cloud, last_gw = cloud_rounds[-1], gw_rounds[-1]
    assert samples['edgefl_round{node="cloud",role="cloud"}'] == last_cloud["round"]
    assert samples['edgefl_accuracy{node="cloud",role="cloud"}'] == last_cloud["accuracy"]
    assert samples['edgefl_participants{node="gw-1",role="gateway"}'] == 2
    assert samples['edgefl_version{node="gw-1",role="gateway"}'] == last_gw["version"]
    for dev, battery in BATTERY.items():
        labels = f'{{device="{dev}",gateway="gw-1"}}'
        assert samples[f"edgefl_device_battery{labels}"] == battery
        profiles = [
            r for t, r in sub.records
            if t.endswith(f"/{dev}") and "buffered" in r and r.get("online") is not False
        ]  # fmt: skip
        assert samples[f"edgefl_device_buffered{labels}"] == profiles[-1]["buffered"]
        statuses = [r for t, r in sub.records if t == T.status("gw-1", dev)]
        assert samples[f"edgefl_device_online{labels}"] == statuses[-1]["online"]


async def test_monitor_once_fails_in_one_line_when_the_broker_is_unreachable() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgefl.cli", "monitor", "--broker", f"127.0.0.1:{free_port()}",
        "--once", "--wait", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    async with within(30):
        out, err = await proc.communicate()
    assert proc.returncode == 1 and out == b""
    assert err.decode().strip().splitlines()[-1].startswith("edgefl monitor: error: could not")
