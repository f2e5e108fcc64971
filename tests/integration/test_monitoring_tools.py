"""The real monitoring tools on a real fleet: Prometheus scraping the exporter, and the
web dashboard in headless Chromium.

One fleet (a cloud, a gateway, two devices training digits on Mosquitto) feeds
both; what each shows must equal what the metrics topics carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import chromium
import pytest
from test_monitoring import BATTERY, Sub, fleet
from timeouts import within

from edgefl.broker import RunningBroker, free_port, wait_for_port
from edgefl.tasks import load_task
from edgefl.topics import Topics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "docs" / "grafana" / "edgefl.json"
PROMETHEUS_CONFIG = REPO / "docs" / "grafana" / "prometheus.yml"
PROMETHEUS_INSTALL = "apt-get install -y --no-install-recommends prometheus"
#: Where to save the page's screenshot (the README's docs/dashboard.png), when set.
SCREENSHOT_ENV = "EDGEFL_DASHBOARD_SCREENSHOT"
T = Topics()


def require_tools() -> str:
    missing = [
        f"{name} ({install})"
        for name, found, install in (
            ("prometheus", shutil.which("prometheus"), PROMETHEUS_INSTALL),
            ("chromium", chromium.binary(), chromium.INSTALL),
        )
        if not found
    ]
    if missing:
        pytest.skip("needs " + ", ".join(missing))
    return str(shutil.which("prometheus"))


@contextlib.asynccontextmanager
async def process(*argv: str, **kwargs: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(*argv, **kwargs)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with within(20):
            await proc.wait()


def prometheus_argv(binary: str, tmp: Path, port: int, target: int) -> list[str]:
    """The shipped config, scraping ``target`` every second."""
    shipped = PROMETHEUS_CONFIG.read_text()
    assert "127.0.0.1:9108" in shipped and "scrape_interval: 5s" in shipped
    config = tmp / "prometheus.yml"
    config.write_text(shipped.replace("127.0.0.1:9108", f"127.0.0.1:{target}").replace("5s", "1s"))
    return [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]  # fmt: skip


def query(port: int, expr: str) -> list[dict[str, Any]]:
    """The result of a PromQL query over Prometheus' HTTP API."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        doc = json.loads(response.read())
    assert doc["status"] == "success", (expr, doc)
    return list(doc["data"]["result"])


def poll(check: Callable[[], Any], timeout: float) -> Any:
    """``check()`` until it is truthy (blocking; run in a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def page_figures(page: chromium.Chromium) -> dict[str, Any]:
    """What the page shows, read from its DOM."""
    return dict(
        page.evaluate("""(() => {
        const node = (id) => document.querySelector(`#tree [data-node="${id}"]`);
        const fields = (e) => Object.fromEntries([...e.querySelectorAll(':scope > [data-field]')]
            .map((f) => [f.dataset.field, f.textContent]));
        const cells = (sel) => [...document.querySelectorAll(sel)]
            .map((r) => [...r.cells].map((c) => c.textContent));
        return {
            cloud: fields(node('cloud')),
            gw: fields(node('gw-1')),
            gw_parent: node('gw-1').parentElement.closest('[data-node]').dataset.node,
            devices: Object.fromEntries([...node('gw-1').querySelectorAll('[data-device]')]
                .map((d) => [d.dataset.device, fields(d)])),
            accuracy: cells('#accuracy [data-node="cloud"] tr'),
            participation: cells('#participation tbody tr'),
            bytes: cells('#bytes tbody tr'),
            rejected: cells('#rejected tbody tr'),
            clipping: cells('#clipping tbody tr'),
        };
    })()""")
    )


async def test_prometheus_and_the_dashboard_show_what_the_metrics_topics_carried(
    broker: RunningBroker, tmp_path: Path
) -> None:
    prometheus = require_tools()
    task = load_task("digits", model="mlp")
    sub = Sub(broker)
    await sub.start()
    exporter_port, prom_port, page_port = free_port(), free_port(), free_port()
    cli = [sys.executable, "-m", "edgefl.cli"]
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL}
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(sub.stop)
        await stack.enter_async_context(process(
            *cli, "monitor", "--broker", broker.url, "--prometheus", str(exporter_port),
            "--no-view", **quiet))  # fmt: skip
        await stack.enter_async_context(
            process(*cli, "dashboard", "--broker", broker.url, "--port", str(page_port), **quiet)
        )
        await stack.enter_async_context(
            process(*prometheus_argv(prometheus, tmp_path, prom_port, exporter_port), **quiet)
        )
        page = await asyncio.to_thread(chromium.Chromium, tmp_path / "chromium")
        stack.callback(page.close)
        await asyncio.to_thread(wait_for_port, "127.0.0.1", page_port, 20)
        await asyncio.to_thread(page.open, f"http://127.0.0.1:{page_port}/")

        async with fleet(broker, tmp_path, task):
            # A child's garbage: the gateway refuses it and counts it by reason.
            junk = await asyncio.create_subprocess_exec(
                "mosquitto_pub", "-p", str(broker.port), "-t", T.update("gw-1", "dev-1"),
                "-m", "not an update",
            )  # fmt: skip
            await junk.wait()
            await sub.until(lambda _: len(sub.rounds("cloud", "cloud")) >= 3, timeout=90)
            # The page follows the fleet live, without a reload.
            live = await asyncio.to_thread(page.wait_for, (
                "+document.querySelector('#tree [data-node=\"cloud\"] [data-field=\"round\"]')"
                ".textContent.split(' ')[1] >= 1"), 20)  # fmt: skip
            assert live
            shot = await asyncio.to_thread(page.screenshot)  # the fleet at work
        await sub.drain()

        cloud_rounds, gw_rounds = sub.rounds("cloud", "cloud"), sub.rounds("gateway", "gw-1")
        last_cloud, last_gw = cloud_rounds[-1], gw_rounds[-1]
        cloud_sel, gw_sel = '{node="cloud"}', '{node="gw-1"}'

        # ---- Prometheus: the last values, and every sample one the topics carried
        def settled() -> bool:
            acc = query(prom_port, f"edgefl_accuracy{cloud_sel}")
            return bool(acc) and float(acc[0]["value"][1]) == last_cloud["accuracy"]

        assert await asyncio.to_thread(poll, settled, 20)
        (participants,) = await asyncio.to_thread(query, prom_port, f"edgefl_participants{gw_sel}")
        assert float(participants["value"][1]) == last_gw["participants"] == 2
        for expr, carried in (
            (f"edgefl_accuracy{cloud_sel}[5m]", {r["accuracy"] for r in cloud_rounds}),
            (f"edgefl_participants{gw_sel}[5m]", {r["participants"] for r in gw_rounds}),
            (f"edgefl_participants{cloud_sel}[5m]", {r["participants"] for r in cloud_rounds}),
        ):
            (series,) = await asyncio.to_thread(query, prom_port, expr)
            values = {float(v) for _, v in series["values"]}
            assert values and values <= carried, expr
        # every Grafana panel's expression returns data from this Prometheus (a rate
        # needs two scrapes of its counter)
        panels = json.loads(GRAFANA.read_text())["panels"]
        for expr in (t["expr"] for p in panels for t in p["targets"]):
            assert await asyncio.to_thread(poll, lambda e=expr: query(prom_port, e), 10), expr

        # ---- the dashboard: the same numbers, in the page
        shown_round = f"round {last_cloud['round']}"
        await asyncio.to_thread(page.wait_for, (
            "document.querySelector('#tree [data-node=\"cloud\"] [data-field=\"round\"]')"
            f".textContent === {json.dumps(shown_round)}"), 20)  # fmt: skip
        await asyncio.sleep(1.0)  # the devices' goodbyes come after the last round
        shown = await asyncio.to_thread(page_figures, page)

    assert shown["cloud"]["accuracy"] == f"accuracy {last_cloud['accuracy']:.3f}"
    assert shown["cloud"]["version"] == f"v{last_cloud['version']}"
    assert shown["gw_parent"] == "cloud"
    assert shown["gw"]["round"] == f"round {last_gw['round']}"
    per_version = {r["version"]: r["accuracy"] for r in cloud_rounds}
    assert shown["accuracy"] == [[f"v{v}", f"{a:.3f}"] for v, a in sorted(per_version.items())][-8:]
    selected = str(last_gw["selected"]) if last_gw["selected"] else "open"  # 0: an open round
    assert ["gw-1", str(last_gw["round"]), "2", selected] in [
        row[:4] for row in shown["participation"]
    ]
    assert ["gateway", "bytes_in", str(last_gw["bytes_in"])] in shown["bytes"]
    assert ["cloud", "bytes_in", str(last_cloud["bytes_in"])] in shown["bytes"]
    for counter in ("bytes_up", "bytes_down"):  # the devices' MQTT byte counters, summed
        last = [[r for t, r in sub.records if t == T.metrics("device", d)][-1] for d in BATTERY]
        assert ["device", counter, str(sum(r[counter] for r in last))] in shown["bytes"]
    refused = {k[len("rejected_") :]: v for k, v in last_gw.items()
               if k.startswith("rejected_") and k != "rejected_total" and v}  # fmt: skip
    assert sum(refused.values()) == last_gw["rejected_total"] >= 1
    assert sorted(r for r in shown["rejected"] if r[0] == "gw-1") == sorted(
        ["gw-1", reason, str(count)] for reason, count in refused.items()
    )
    assert ["gw-1", str(last_gw["clipped"])] in [row[:2] for row in shown["clipping"]]
    for dev, battery in BATTERY.items():
        device = shown["devices"][dev]
        statuses = [r for t, r in sub.records if t == T.status("gw-1", dev)]
        trained = [r for t, r in sub.records if t == T.metrics("device", dev)
                   and r.get("event") == "round"]  # fmt: skip
        assert device["battery"] == f"battery {battery * 100:.0f}%"
        assert device["link"] == "wifi"
        assert device["online"] == ("online" if statuses[-1]["online"] else "offline")
        assert device["last_round"] == f"last round {trained[-1]['round']}"
    assert shot.startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get(SCREENSHOT_ENV):
        Path(os.environ[SCREENSHOT_ENV]).write_bytes(shot)
