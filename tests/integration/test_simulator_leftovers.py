"""A simulation on a broker it did not start leaves none of its retained messages behind."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
from timeouts import within

from edgefl.broker import RunningBroker

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def _retained(url: str, topic: str) -> list[str]:
    """The retained topics under ``topic``: they come right after the subscription."""
    host, port = url.rsplit(":", 1)
    found: list[str] = []
    async with aiomqtt.Client(host, int(port), identifier="leftovers-check") as client:
        await client.subscribe(topic, qos=1)
        try:
            async with within(1.5):
                async for msg in client.messages:
                    if msg.retain and msg.payload:
                        found.append(str(msg.topic))
        except TimeoutError:
            pass
    return found


async def test_a_run_on_an_external_broker_clears_its_retained_messages(
    broker: RunningBroker, tmp_path: Path
) -> None:
    # Another fleet's retained status on the same broker: not the run's to clear.
    host, port = broker.url.rsplit(":", 1)
    async with aiomqtt.Client(host, int(port), identifier="other-fleet") as other:
        await other.publish("edgefl/site-9/status/dev-9", b'{"online":true}', qos=1, retain=True)
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "edgefl.cli", "simulate", "--broker", broker.url, "--rounds", "1",
         "--devices", "1", "--out", str(tmp_path / "run"), "--plain"],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert await _retained(broker.url, "edgefl/#") == ["edgefl/site-9/status/dev-9"]
