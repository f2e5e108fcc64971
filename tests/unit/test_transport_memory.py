"""The memory bus beyond what it shares with Mosquitto: link loss, outages, acks, inboxes.

(What it shares, it is held to in tests/integration/test_transport_semantics.py.)
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from timeouts import within

from edgefl.transport import (
    AnyTransport,
    MemoryBroker,
    MemoryTransport,
    Message,
    NotConnected,
    PublishTimeout,
    Will,
)


async def _up(t: MemoryTransport, *topics: str) -> MemoryTransport:
    for topic in topics:
        await t.subscribe(topic)
    await t.__aenter__()
    await t.wait_connected(1)
    return t


async def _take(t: AnyTransport, count: int) -> list[Message]:
    got: list[Message] = []
    async with within(1):
        async for message in t.messages():
            got.append(message)
            if len(got) == count:
                break
    return got


async def test_a_dropped_link_fires_the_will_and_the_session_resumes_on_reconnect() -> None:
    bus = MemoryBroker()
    watcher = await _up(MemoryTransport(bus, "watcher"), "status/#")
    tx = await _up(MemoryTransport(bus, "tx"))
    dev = MemoryTransport(bus, "dev", will=Will("status/dev", b"offline"), persistent=True)
    await _up(dev, "model/#")

    bus.drop("dev")
    assert not dev.connected and bus.clients() == ["watcher", "tx"]
    await tx.publish("model/1", b"m1")  # while dev is away
    await dev.wait_connected(1)

    assert [(m.topic, m.payload) for m in await _take(watcher, 1)] == [("status/dev", b"offline")]
    assert [m.topic for m in await _take(dev, 1)] == ["model/1"]
    assert dev.connects == 2 and bus.retained == {"status/dev": b"offline"}
    for t in (watcher, tx, dev):
        await t.close()
    assert bus.clients() == []


async def test_while_the_broker_is_down_publishes_fail_and_clients_come_back_after() -> None:
    bus = MemoryBroker()
    tx = await _up(MemoryTransport(bus, "tx"))
    await tx.publish("model", b"v1", retain=True)
    bus.stop()
    assert not tx.connected
    with pytest.raises(NotConnected):
        await tx.publish("model", b"v2", retain=True)
    await asyncio.sleep(0.05)  # reconnect attempts fail while it is down
    assert not tx.connected
    bus.start()
    await tx.wait_connected(1)
    rx = await _up(MemoryTransport(bus, "rx"), "model")
    assert [m.payload for m in await _take(rx, 1)] == [b"v1"]  # retained survived
    await tx.close()
    await rx.close()


async def test_without_acks_a_qos1_publish_times_out_and_is_not_routed() -> None:
    bus = MemoryBroker()
    rx = await _up(MemoryTransport(bus, "rx"), "t")
    tx = await _up(MemoryTransport(bus, "tx"))
    bus.acks = False
    with pytest.raises(PublishTimeout):
        await tx.publish("t", b"lost", timeout=0.01)
    await tx.publish("t", b"qos0", qos=0)
    bus.acks = True
    await tx.publish("t", b"qos1")
    assert [m.payload for m in await _take(rx, 2)] == [b"qos0", b"qos1"]
    assert (tx.messages_out, tx.bytes_out, rx.bytes_in) == (2, 8, 8)
    await rx.close()
    await tx.close()


async def test_a_link_lost_while_waiting_for_an_ack_is_not_connected() -> None:
    bus = MemoryBroker()
    tx = await _up(MemoryTransport(bus, "tx"))
    bus.acks = False
    waiting = asyncio.ensure_future(tx.publish("t", b"x", timeout=5))
    await asyncio.sleep(0)
    bus.drop("tx")
    with pytest.raises(NotConnected):
        async with within(1):
            await waiting
    await tx.close()


async def test_a_bounded_inbox_counts_what_it_drops() -> None:
    bus = MemoryBroker()
    rx = await _up(MemoryTransport(bus, "rx", queue_size=2), "t")
    tx = await _up(MemoryTransport(bus, "tx"))
    for i in range(3):
        await tx.publish("t", bytes([i]))
    assert (rx.pending(), rx.dropped) == (2, 1)
    assert [m.payload for m in await _take(rx, 2)] == [b"\x00", b"\x01"]
    await rx.close()
    await tx.close()


async def test_an_on_message_handler_failure_is_logged_and_the_session_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = MemoryBroker()
    seen: list[bytes] = []

    def handle(message: Message) -> None:
        if message.payload == b"bad":
            raise ValueError("handler bug")
        seen.append(message.payload)

    rx = await _up(MemoryTransport(bus, "rx", on_message=handle), "t")
    tx = await _up(MemoryTransport(bus, "tx"))
    for payload in (b"bad", b"good"):
        await tx.publish("t", payload)
    assert seen == [b"good"] and rx.connected and rx.connects == 1
    assert any("handler bug" in str(r.exc_info and r.exc_info[1]) for r in caplog.records)
    await rx.close()
    await tx.close()


async def test_filters_follow_mqtt_rules() -> None:
    bus = MemoryBroker()
    everything = await _up(MemoryTransport(bus, "all"), "#")
    below = await _up(MemoryTransport(bus, "below"), "a/#")
    tx = await _up(MemoryTransport(bus, "tx"))
    for topic in ("$SYS/load", "a", "a/b/c", "b"):
        await tx.publish(topic, b"")
    assert [m.topic for m in await _take(everything, 3)] == ["a", "a/b/c", "b"]
    assert [m.topic for m in await _take(below, 2)] == ["a", "a/b/c"]
    for bad in ("a/#/b", "a+", "#a"):
        with pytest.raises(ValueError):
            await tx.subscribe(bad)
    with pytest.raises(ValueError):
        await tx.publish("a/+", b"")
    for t in (everything, below, tx):
        await t.close()


async def test_a_thousand_messages_cross_the_bus_in_order_and_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    bus = MemoryBroker()
    rx = await _up(MemoryTransport(bus, "rx"), "u/+")
    tx = await _up(MemoryTransport(bus, "tx"))
    for i in range(1000):
        await tx.publish(f"u/{i % 7}", i.to_bytes(2, "big"))
    got = await _take(rx, 1000)
    assert [int.from_bytes(m.payload, "big") for m in got] == list(range(1000))
    assert caplog.records == []
    await rx.close()
    await tx.close()
