"""One aggregation node on a real Mosquitto: rejections, partial participation, re-announcing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import numpy as np
import pytest
from timeouts import within

from edgefl.aggregator import Aggregator
from edgefl.broker import RunningBroker
from edgefl.config import AggregatorSettings
from edgefl.transport.chunks import split
from edgefl.wire import Status, encode_status, encode_update, sign

sys.path.insert(0, str(Path(__file__).parent))
from aggregator_fakes import (
    Harness,
    TinyTask,
    delta_of,
    harness,
    make_update,
    node_settings,
    running,
)

pytestmark = pytest.mark.integration
KEY = bytes(range(32))


def _settings(broker: RunningBroker, tmp_path: Path, **kw: Any) -> AggregatorSettings:
    return node_settings(broker.url, tmp_path, **kw)


async def _close_round(h: Harness, version: int, update: Any) -> dict[str, Any]:
    await h.send("cloud", update)
    await h.wait_model("cloud", version + 1)
    return await h.wait_metrics("cloud", event="round", version=version + 1)


async def test_every_rejection_is_counted_once_and_a_valid_update_still_lands(
    broker: RunningBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(
        broker,
        tmp_path,
        quorum=0.5,
        max_staleness=1,
        max_update_norm=5.0,
        max_update_bytes=4096,
        keys={"signer": KEY.hex()},
    )
    caplog.set_level(logging.WARNING, logger="edgefl.aggregator")
    async with harness(broker.url) as h, running(settings):
        await h.status("cloud", "d1")
        await h.status("cloud", "signer")
        await h.wait_model("cloud", 0)
        await _close_round(h, 0, make_update("d1", 0, delta_of(0), base=0))
        clean = await _close_round(h, 1, make_update("d1", 1, delta_of(1), base=1))
        assert clean["rejected_total"] == 0

        good = make_update("d1", 2, delta_of(2), base=2)
        nan = msgspec.msgpack.decode(encode_update(make_update("d1", 21, delta_of(2), base=2)))
        nan["tensors"][0].update(codec="u8", q=bytes(12), lo=float("nan"))
        # Content rejections are settled (receipted): each crafted update has its own seq.
        wrong_shape = make_update("d1", 20, {"w": np.zeros((4, 3), np.float32)}, base=2)
        whole = b"\x81\xa1v\x01" + bytes(3000)
        bad_chunks = split(whole, 1500)
        bad_chunks[-1] = bad_chunks[-1][:-4] + b"oops"  # fails the set's sha256
        crafted: list[tuple[str, bytes]] = [
            ("d1", b"\x00 garbage"),
            ("d1", b"\x00 garbage again"),  # counted again, logged once
            ("d1", bytes(5000)),  # oversized
            ("d1", encode_update(wrong_shape)),
            ("d1", msgspec.msgpack.encode(nan)),  # NaN lo
            ("d1", encode_update(make_update("d1", 1, delta_of(3), base=2))),  # duplicate seq
            ("d1", encode_update(make_update("d1", 7, delta_of(3), base=0))),  # stale base
            ("stranger", encode_update(make_update("stranger", 0, delta_of(3), base=2))),
            ("signer", encode_update(good)),  # topic and sender disagree
            ("signer", encode_update(sign(make_update("signer", 0, delta_of(3), base=2), b"x"))),
            ("d1", encode_update(make_update("d1", 8, delta_of(3, scale=10.0), base=2))),  # norm
            *(("d1", c) for c in bad_chunks),
        ]
        for sender, payload in crafted:
            await h.raw("cloud", sender, payload)
        # Within staleness, for an older version: accepted into the current round.
        m = await _close_round(h, 2, make_update("d1", 9, delta_of(4), base=1))

    expected = {
        "malformed": 3,
        "oversized": 1,
        "shape": 1,
        "nonfinite": 1,
        "stale": 1,
        "unknown_sender": 2,
        "bad_signature": 1,
        "norm": 1,
        "chunk_timeout": 0,
    }
    assert {k: m[f"rejected_{k}"] for k in expected} == expected
    assert m["rejected_total"] == sum(expected.values())
    assert m["redelivered"] == 1  # the duplicate seq: dropped, counted, no rejection
    assert (m["participants"], m["staleness_max"], m["samples"]) == (1, 1, 10)
    warnings = [r.getMessage() for r in caplog.records if "rejected (malformed)" in r.getMessage()]
    assert len([w for w in warnings if "'d1'" in w]) == 1


async def test_silent_or_vanished_children_do_not_stall_a_round(
    broker: RunningBroker, tmp_path: Path
) -> None:
    settings = _settings(broker, tmp_path, per_round=3, train={"deadline_s": 1.5})
    async with harness(broker.url) as h, running(settings):
        for child in ("d1", "d2", "d3"):
            await h.status("cloud", child)
        first = await h.wait_model("cloud", 0)
        assert first.selected == ["d1", "d2", "d3"]
        # Nobody answers: a new round is announced, same version, a later deadline.
        again = await h.wait_metrics("cloud", event="reannounce", reannounced=1, timeout=5)
        assert (again["round"], again["version"]) == (1, 0)
        assert h.models["cloud"][-1].deadline > first.deadline

        # d3 stays online but silent: the round closes at its deadline with two updates.
        await h.send("cloud", make_update("d1", 0, delta_of(1), base=0))
        await h.send("cloud", make_update("d2", 0, delta_of(2), base=0))
        m = await h.wait_metrics("cloud", event="round", version=1, timeout=5)
        assert (m["close"], m["participants"], m["selected"]) == ("deadline", 2, 3)
        assert m["round_ms"] <= 2 * 1500 + 1000  # opened, re-announced once, closed

        # d3 vanishes mid-round (its will): the others' answers close the round at once.
        await h.wait_model("cloud", 1)
        await h.send("cloud", make_update("d1", 1, delta_of(3), base=1))
        await h.send("cloud", make_update("d2", 1, delta_of(4), base=1))
        await h.client.publish(
            h.topics.status("cloud", "d3"),
            encode_status(Status(online=False, id="d3")),
            qos=1,
            retain=True,
        )
        m = await h.wait_metrics("cloud", event="round", version=2, timeout=5)
        assert (m["close"], m["participants"]) == ("all", 2)
        assert m["round_ms"] < 1500


async def test_a_gateway_reports_its_power_and_link_to_its_parent(
    broker: RunningBroker, tmp_path: Path
) -> None:
    from edgefl.profiles import Reading
    from edgefl.wire import decode_status

    class OnBattery:
        def read(self) -> Reading:
            return Reading(battery=0.42, charging=False, link="cellular", uplink_kbps=800.0)

    settings = _settings(broker, tmp_path, id="gw-9", role="gateway")
    async with (
        aiomqtt.Client(broker.host, broker.port) as client,
        Aggregator(settings, TinyTask(), reader=OnBattery()) as node,
    ):
        await client.subscribe("edgefl/cloud/status/gw-9", qos=1)
        task = asyncio.create_task(node.run())
        try:
            async with within(10):
                async for message in client.messages:
                    status = decode_status(bytes(message.payload))  # type: ignore[arg-type]
                    if status.online:
                        break
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert (status.role, status.battery, status.charging) == ("gateway", 0.42, False)
    assert (status.link, status.uplink_kbps, status.model_version) == ("cellular", 800.0, 0)
