"""Faults injected into running nodes: kill -9 and SIGTERM with updates in the open round, a
sync lost at a killed cloud or refused as stale, a damaged checkpoint, a restart that
changes how the retained model travels. Every update is accounted for by (sender, seq)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from timeouts import within

from edgefl.aggregator import Aggregator
from edgefl.broker import RunningBroker
from edgefl.config import AggregatorSettings
from edgefl.params import Params, spec_of
from edgefl.transport import NotConnected
from edgefl.wire import encode_update

sys.path.insert(0, str(Path(__file__).parent))
from aggregator_fakes import Harness, TinyTask, delta_of, harness, make_update, params_of

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent
#: Plain sample-weighted FedAvg, checked exactly below: no share cap, no clip.
# Exact averages: no share cap, no clipping, and the model down whole in float32.
PLAIN = {"max_weight_share": 1.0, "clip_factor": 0.0, "downlink_codec": "f32"}
PLAIN_FLAGS = ["--max-weight-share", "1.0", "--clip-factor", "0", "--downlink-codec", "f32"]


def _start(
    command: str, node: str, broker: RunningBroker, state: Path, log: Path, *flags: str
) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "edgefl.cli", command, "--id", node, "--broker", broker.url,
            "--state-dir", str(state), "--task", "aggregator_fakes:TinyTask",
            "--train-deadline-s", "60", *PLAIN_FLAGS, *flags]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=15)


async def _announcements(h: Harness, node: str, version: int, count: int) -> None:
    await h.wait_for(
        lambda: len([m for m in h.models.get(node, []) if m.version == version]) >= count,
        timeout=60,
    )


def _average(base: Params, parts: list[tuple[int, Params]]) -> Params:
    total = sum(n for n, _ in parts)
    return {k: base[k] + sum(n * d[k].astype(np.float64) for n, d in parts) / total for k in base}


def _gap(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> float:
    return max(float(np.abs(got[k] - want[k]).max()) for k in want)


@contextlib.asynccontextmanager
async def running(settings: AggregatorSettings, task: Any = None) -> AsyncIterator[Aggregator]:
    async with Aggregator(settings, task or TinyTask()) as node:
        runner = asyncio.create_task(node.run())
        try:
            yield node
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def until(condition: Any, timeout: float) -> None:
    async with within(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def journaled(node_dir: Path, *payloads: bytes) -> None:
    """Wait until the node has written these raw updates to its journal."""

    def written() -> bool:
        path = node_dir / "journal.log"
        data = path.read_bytes() if path.exists() else b""
        return all(p in data for p in payloads)

    await until(written, 10)


# ------------------------------------------------------------ the open round survives
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_updates_folded_before_a_stop_close_the_round_after_restart_without_a_resend(
    broker: RunningBroker, tmp_path: Path, sig: int
) -> None:
    log = tmp_path / "cloud.log"
    init = TinyTask().init_params(0)
    sent = {(c, 0): (10 * i, delta_of(i)) for i, c in enumerate(("c1", "c2", "c3"), start=1)}
    async with harness(broker.url) as h:
        for child in ("c1", "c2", "c3"):
            await h.status("cloud", child)
        proc = _start("cloud", "cloud", broker, tmp_path, log, "--min-updates", "3")
        try:
            await _announcements(h, "cloud", 0, 1)
            folded = [
                make_update(c, 0, sent[(c, 0)][1], base=0, n=sent[(c, 0)][0]) for c in ("c1", "c2")
            ]
            for update in folded:
                await h.send("cloud", update)
            # Both folded into the open round (it needs three), and journaled.
            await journaled(tmp_path / "cloud", *map(encode_update, folded))
            assert proc.poll() is None, log.read_text()[-3000:]
            _stop(proc, sig)

            proc = _start("cloud", "cloud", broker, tmp_path, log, "--min-updates", "3")
            await _announcements(h, "cloud", 0, 2)  # the restarted node announces again
            n, delta = sent[("c3", 0)]
            await h.send("cloud", make_update("c3", 0, delta, base=0, n=n))
            m = await h.wait_metrics("cloud", event="round", version=1, timeout=20)
            model = await h.wait_model("cloud", 1)
        finally:
            _stop(proc)
    # Each (sender, seq) sent once, none resent: all three counted exactly once.
    assert (m["participants"], m["updates"], m["samples"], m["rejected_total"]) == (3, 3, 60, 0), (
        log.read_text()[-3000:]
    )
    assert _gap(params_of(model), _average(init, list(sent.values()))) < 1e-5


# ------------------------------------------------------- syncs: at least once, folded once
def _gateway(broker: RunningBroker, state: Path, **kw: Any) -> AggregatorSettings:
    fields: dict[str, Any] = {"min_updates": 2, "sync_every": 2, "update_codec": "f32", **PLAIN}
    fields.update(kw)
    return AggregatorSettings(
        id="gw1", role="gateway", parent="cloud", mqtt={"broker": broker.url}, state_dir=state,
        **fields,
    )  # fmt: skip


DEVICES = {"a1": 10, "a2": 30}


async def _device_round(h: Harness, r: int, base: int) -> None:
    for i, (dev, n) in enumerate(DEVICES.items()):
        delta = delta_of(10 * r + i)
        await h.send("gw1", make_update(dev, r, delta, base=base, n=n, round=r))


def _work(*rounds: int) -> Params:
    """What the gateway's model moved by in these device rounds (plain FedAvg)."""
    zero = {k: np.zeros_like(v) for k, v in delta_of(0).items()}
    moves = [_average(zero, [(n, delta_of(10 * r + i)) for i, n in enumerate(DEVICES.values())])
             for r in rounds]  # fmt: skip
    return {k: sum(m[k] for m in moves) for k in zero}


@pytest.mark.parametrize("journal_lost", [False, True], ids=["journal", "no-journal"])
async def test_a_sync_in_the_open_round_of_a_killed_cloud_is_folded_exactly_once(
    broker: RunningBroker, tmp_path: Path, journal_lost: bool
) -> None:
    log = tmp_path / "cloud.log"
    init = TinyTask().init_params(0)
    cloud_flags = ("--min-updates", "2")
    async with harness(broker.url) as h:
        for dev in DEVICES:
            await h.status("gw1", dev)
        await h.status("cloud", "gw2")
        proc = _start("cloud", "cloud", broker, tmp_path, log, *cloud_flags)
        try:
            await _announcements(h, "cloud", 0, 1)
            async with running(_gateway(broker, tmp_path / "gw")) as gw:
                sync, outbox = gw.sync, gw.outbox
                assert sync is not None and outbox is not None
                await h.wait_model("gw1", 0)
                await _device_round(h, 0, base=0)
                await h.wait_model("gw1", 1)
                await _device_round(h, 1, base=1)  # the sync: both rounds, n = 80
                await until(lambda: sync.inflight is not None and len(outbox) == 0, 10)
                assert sync.inflight is not None  # folded into the cloud's open round:
                await journaled(tmp_path / "cloud", sync.inflight.payload)  # it needs two
                _stop(proc)
                if journal_lost:  # only the gateway's resend can save the work now
                    for leftover in (tmp_path / "cloud").glob("journal*"):
                        leftover.unlink()
                proc = _start("cloud", "cloud", broker, tmp_path, log, *cloud_flags)
                await _announcements(h, "cloud", 0, 2)
                gw2 = (40, delta_of(50))
                await h.send("cloud", make_update("gw2", 0, gw2[1], base=0, n=gw2[0]))
                m = await h.wait_metrics("cloud", event="round", version=1, timeout=20)
                model = params_of(await h.wait_model("cloud", 1))
                await until(lambda: sync.parent_version == 1 and sync.inflight is None, 10)
        finally:
            _stop(proc)
    # gw1's two rounds (n = 2 * 40) counted once, whether replayed, resent, or both.
    assert (m["participants"], m["samples"]) == (2, 80 + 40), log.read_text()[-3000:]
    assert _gap(model, _average(init, [(80, _work(0, 1)), gw2])) < 1e-5


async def test_a_sync_refused_as_stale_after_an_outage_is_folded_into_the_next_one(
    broker: RunningBroker, tmp_path: Path
) -> None:
    cloud_settings = AggregatorSettings(
        id="cloud", role="cloud", mqtt={"broker": broker.url}, state_dir=tmp_path,
        max_staleness=1, quorum=0.01, **PLAIN,
    )  # fmt: skip
    gw_settings = _gateway(broker, tmp_path, sync_every=1, max_staleness=1, train={"deadline_s": 2})
    blocked = True
    async with harness(broker.url) as h:
        for dev in DEVICES:
            await h.status("gw1", dev)
        await h.status("cloud", "gw2")
        async with running(cloud_settings) as cloud, running(gw_settings) as gw:
            sync = gw.sync
            assert sync is not None and gw.link is not None
            publish, sync_topic = gw.transport.publish, gw.link.topic

            async def flaky_uplink(topic: str, payload: bytes, **kw: Any) -> None:
                if blocked and topic == sync_topic:
                    raise NotConnected("the uplink is down")
                await publish(topic, payload, **kw)

            gw.transport.publish = flaky_uplink  # type: ignore[method-assign]
            await h.wait_model("gw1", 0)
            await _device_round(h, 0, base=0)  # sync 0: base 0, n = 40, stuck
            await until(lambda: sync.inflight is not None, 10)
            for seq in (0, 1):  # meanwhile the cloud moves two versions on
                await h.send("cloud", make_update("gw2", seq, delta_of(60 + seq), base=seq, n=5))
                await h.wait_model("cloud", seq + 1)
            # Two versions past its base with max_staleness 1: the cloud will never fold
            # sync 0, so its work goes back into what the next sync carries.
            await until(lambda: sync.parent_version == 2 and sync.inflight is None, 10)
            blocked = False
            version = gw.version
            await h.wait_model("gw1", version)
            await _device_round(h, 1, base=version)  # sync 1: both rounds, n = 80
            m = await h.wait_metrics("cloud", event="round", version=3, timeout=20)
            before = params_of(await h.wait_model("cloud", 2))
            model = params_of(await h.wait_model("cloud", 3))
            await until(lambda: sync.inflight is None and sync.parent_version == 3, 10)
            stale = cloud.rejected.counts
    # The cloud folds sync 1 alone: v3 is v2 plus both rounds' work, with both rounds' samples.
    assert (m["participants"], m["samples"]) == (1, 80), m
    assert _gap(model, {k: before[k] + _work(0, 1)[k] for k in before}) < 1e-5
    assert sum(stale.values()) <= 1  # sync 0 itself, if it was delivered at all


# ------------------------------------------------------- one model per version, one form
async def test_a_damaged_checkpoint_never_republishes_a_version_with_another_model(
    broker: RunningBroker, tmp_path: Path
) -> None:
    log = tmp_path / "cloud.log"
    async with harness(broker.url) as h:
        await h.status("cloud", "c1")
        proc = _start("cloud", "cloud", broker, tmp_path, log)
        try:
            await _announcements(h, "cloud", 0, 1)
            for seq in (0, 1):
                await h.send("cloud", make_update("c1", seq, delta_of(seq), base=seq, n=10))
                await h.wait_model("cloud", seq + 1)
            _stop(proc, signal.SIGTERM)
            newest = max((tmp_path / "cloud").glob("state-*-v2-*.ckpt"))
            newest.write_bytes(newest.read_bytes()[:-7])  # torn: the v1 generation is loaded
            proc = _start("cloud", "cloud", broker, tmp_path, log)
            resumed = await h.wait_for(lambda: [m for m in h.models["cloud"][3:]], timeout=30)
            await h.send("cloud", make_update("c1", 2, delta_of(2), base=resumed[0].version, n=10))
            await h.wait_metrics("cloud", event="round", version=resumed[0].version + 1)
        finally:
            _stop(proc)
    seen: dict[int, Params] = {}
    for model in h.models["cloud"]:
        params = params_of(model)
        if model.version in seen:
            assert _gap(params, seen[model.version]) == 0, f"two models as v{model.version}"
        seen[model.version] = params
    assert resumed[0].version == 3, log.read_text()[-3000:]  # past every version published
    assert _gap(params_of(resumed[0]), seen[1]) == 0


class WideTask(TinyTask):
    """A model of 16 kB: it travels in chunks under a small ``max_message_bytes``."""

    name = "wide"

    def init_params(self, seed: int = 0) -> Params:
        rng = np.random.default_rng(seed)
        return {"w": rng.standard_normal((64, 64)).astype(np.float32)}

    def spec(self) -> Any:
        return spec_of(self.init_params())


async def _retained(broker: RunningBroker, node: str) -> dict[str, bytes]:
    """Every retained message on the node's model topic and its chunk sub-topics."""
    host, _, port = broker.url.rpartition(":")
    found: dict[str, bytes] = {}
    async with aiomqtt.Client(host, int(port), identifier=f"probe-{time.monotonic_ns()}") as c:
        for topic in (f"edgefl/{node}/model", f"edgefl/{node}/model/chunk/+"):
            await c.subscribe(topic, qos=1)
        with contextlib.suppress(asyncio.TimeoutError):
            async with within(1.0):
                async for msg in c.messages:
                    if msg.retain and isinstance(msg.payload, bytes) and msg.payload:
                        found[msg.topic.value] = msg.payload
    return found


@pytest.mark.parametrize("first", ["chunked", "whole"])
async def test_a_restart_in_the_other_form_leaves_no_retained_model_of_the_first(
    broker: RunningBroker, tmp_path: Path, first: str
) -> None:
    forms = {"chunked": {"max_message_bytes": 4096}, "whole": {}}
    second = "whole" if first == "chunked" else "chunked"
    whole = "edgefl/cloud/model"
    left: dict[str, bytes] = {}

    def only(form: str) -> bool:
        chunks = [t for t in left if t.startswith(whole + "/chunk/")]
        return set(left) == {whole} if form == "whole" else whole not in left and len(chunks) > 1

    for form in (first, second):
        settings = AggregatorSettings(
            id="cloud", role="cloud", mqtt={"broker": broker.url, **forms[form]}, state_dir=tmp_path
        )
        async with running(settings, WideTask()), within(20):
            while not only(form):  # a subscriber that comes now gets this form only
                left = await _retained(broker, "cloud")
    assert only(second), sorted(left)
