"""The MQTT semantics edgefl relies on, checked on both transports.

Every test runs against a real Mosquitto through ``Transport`` and against
``MemoryBroker`` through ``MemoryTransport``: what passes here is what unit
tests on the memory bus may rely on. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
from timeouts import within

from edgefl.config import MqttSettings
from edgefl.transport import (
    AnyTransport,
    MemoryBroker,
    MemoryTransport,
    Message,
    NotConnected,
    Transport,
    TransportClosed,
    Will,
)


@dataclass
class Backend:
    name: str
    #: (client_id, will=, persistent=, on_connect=) -> a transport, not yet entered
    make: Callable[..., AnyTransport]
    #: end a transport's connection as a crash would: no DISCONNECT, then close it
    vanish: Callable[[AnyTransport], Awaitable[None]]


async def _kill_socket(transport: AnyTransport) -> None:
    assert isinstance(transport, Transport)
    sock = transport._client._client.socket()  # type: ignore[union-attr]
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    async with within(10):
        while transport.connected:
            await asyncio.sleep(0.01)
    await transport.close()


@pytest.fixture(params=["memory", pytest.param("mosquitto", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        bus = MemoryBroker()

        async def drop(transport: AnyTransport) -> None:
            assert isinstance(transport, MemoryTransport)
            bus.drop(transport.client_id)
            await transport.close()

        yield Backend("memory", lambda cid, **kw: MemoryTransport(bus, cid, **kw), drop)
    else:
        running = request.getfixturevalue("broker")
        settings = MqttSettings(broker=running.url, reconnect_min_s=0.05)
        yield Backend("mosquitto", lambda cid, **kw: Transport(settings, cid, **kw), _kill_socket)


async def _connected(transport: AnyTransport, *topics: str) -> AnyTransport:
    await transport.__aenter__()
    await transport.wait_connected(10)
    for topic in topics:
        await transport.subscribe(topic)
    return transport


async def _receive(transport: AnyTransport, count: int) -> list[Message]:
    got: list[Message] = []
    async with within(10):
        async for message in transport.messages():
            got.append(message)
            if len(got) == count:
                break
    return got


def _topics(messages: list[Message]) -> list[str]:
    return [m.topic for m in messages]


async def test_wildcards_route_each_message_to_the_filters_it_matches(backend: Backend) -> None:
    one = await _connected(backend.make("one"), "t/+/x")
    many = await _connected(backend.make("many"), "t/#")
    tx = await _connected(backend.make("tx"))
    try:
        for topic in ("t/1/x", "t/2/y", "t/1/x/z", "u/1/x", "t/end/x"):
            await tx.publish(topic, topic.encode())
        assert _topics(await _receive(one, 2)) == ["t/1/x", "t/end/x"]
        got = await _receive(many, 4)
        assert _topics(got) == ["t/1/x", "t/2/y", "t/1/x/z", "t/end/x"]
        assert [m.payload for m in got] == [t.encode() for t in _topics(got)]
        assert not any(m.retain for m in got)
    finally:
        for t in (one, many, tx):
            await t.close()


async def test_a_late_subscriber_gets_the_retained_message_and_an_empty_one_clears_it(
    backend: Backend,
) -> None:
    tx = await _connected(backend.make("tx"))
    try:
        await tx.publish("r/a", b"v1", retain=True)
        await tx.publish("r/a", b"v2", retain=True)
        late = await _connected(backend.make("late"), "r/#")
        (first,) = await _receive(late, 1)
        assert (first.topic, first.payload, first.retain) == ("r/a", b"v2", True)
        await late.close()

        await tx.publish("r/a", b"", retain=True)
        await tx.publish("r/b", b"kept", retain=True)
        later = await _connected(backend.make("later"), "r/#")
        await tx.publish("r/end", b"")
        got = await _receive(later, 2)
        assert [(m.topic, m.payload, m.retain) for m in got] == [
            ("r/b", b"kept", True),
            ("r/end", b"", False),
        ]
        await later.close()
    finally:
        await tx.close()


async def test_qos1_messages_wait_for_an_offline_persistent_session(backend: Backend) -> None:
    tx = await _connected(backend.make("tx"))
    away = await _connected(backend.make("away", persistent=True), "q/#")
    gone = await _connected(backend.make("gone"), "q/#")
    await away.close()
    await gone.close()
    try:
        await tx.publish("q/1", b"1", qos=1)
        await tx.publish("q/0", b"0", qos=0)  # QoS 0 is never queued for the absent
        await tx.publish("q/2", b"2", qos=1)
        back = await _connected(backend.make("away", persistent=True), "q/#")
        fresh = await _connected(backend.make("gone"), "q/#")
        await tx.publish("q/end", b"", qos=1)
        assert _topics(await _receive(back, 3)) == ["q/1", "q/2", "q/end"]
        assert _topics(await _receive(fresh, 1)) == ["q/end"]
        await back.close()
        await fresh.close()
    finally:
        await tx.close()


async def test_the_last_will_fires_when_a_client_vanishes_but_not_on_a_clean_close(
    backend: Backend,
) -> None:
    watcher = await _connected(backend.make("watcher"), "w/#")
    tx = await _connected(backend.make("tx"))
    try:
        polite = await _connected(backend.make("polite", will=Will("w/polite", b"gone")))
        await polite.close()
        crash = await _connected(backend.make("crash", will=Will("w/crash", b"gone")))
        await backend.vanish(crash)
        (will,) = await _receive(watcher, 1)
        assert (will.topic, will.payload) == ("w/crash", b"gone")
        await tx.publish("w/end", b"")
        assert _topics(await _receive(watcher, 1)) == ["w/end"]
        # The will was retained: a newcomer learns that ``crash`` is gone.
        newcomer = await _connected(backend.make("newcomer"), "w/crash")
        (kept,) = await _receive(newcomer, 1)
        assert (kept.payload, kept.retain) == (b"gone", True)
        await newcomer.close()
    finally:
        await watcher.close()
        await tx.close()


async def test_messages_ends_when_the_transport_closes(backend: Backend) -> None:
    rx = await _connected(backend.make("rx"), "m/#")
    tx = await _connected(backend.make("tx"))
    seen: list[Message] = []

    async def consume() -> None:
        async for message in rx.messages():
            seen.append(message)

    consumer = asyncio.ensure_future(consume())
    try:
        await tx.publish("m/1", b"1")
        async with within(10):
            while not seen:
                await asyncio.sleep(0.01)
        await rx.close()
        async with within(5):
            await consumer
        assert _topics(seen) == ["m/1"] and not rx.connected
        assert [m async for m in rx.messages()] == []  # a closed transport yields nothing
    finally:
        consumer.cancel()
        await tx.close()


async def test_publishing_offline_or_after_close_raises_and_waiters_do_not_hang(
    backend: Backend,
) -> None:
    t = backend.make("t")
    with pytest.raises(NotConnected):
        await t.publish("x", b"")
    await _connected(t)
    await t.close()
    with pytest.raises(TransportClosed):
        await t.publish("x", b"")
    with pytest.raises(TransportClosed):
        await t.wait_connected()
    assert isinstance(TransportClosed("x"), NotConnected)  # callers keep data for later


async def test_a_close_releases_its_waiters_and_a_bounded_wait_times_out_at_once(
    backend: Backend,
) -> None:
    t = backend.make("t")
    unbounded = asyncio.ensure_future(t.wait_connected())
    bounded = asyncio.ensure_future(t.wait_connected(60))
    await asyncio.sleep(0.01)
    await t.close()
    async with within(1):
        with pytest.raises(TransportClosed):
            await unbounded
        # A closed transport never connects: callers that bound the wait (and
        # handle its TimeoutError) hear it now, not at the bound.
        with pytest.raises(asyncio.TimeoutError):
            await bounded
        with pytest.raises(asyncio.TimeoutError):
            await t.wait_connected(60)


async def test_a_failing_on_connect_is_logged_and_the_transport_connects_again(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    async def on_connect() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("boom in on_connect")

    caplog.set_level(logging.WARNING, logger="edgefl.transport")
    rx = backend.make("rx", on_connect=on_connect)
    await rx.subscribe("c/#")
    tx = await _connected(backend.make("tx"))
    try:
        async with rx:
            async with within(10):
                while len(calls) < 2 or not rx.connected:
                    await asyncio.sleep(0.01)
            await tx.publish("c/1", b"after")
            (message,) = await _receive(rx, 1)
            assert message.payload == b"after"
    finally:
        await tx.close()
    failures = [
        r for r in caplog.records if r.exc_info and "boom in on_connect" in str(r.exc_info[1])
    ]
    assert len(failures) == 1, caplog.text


async def test_wait_connected_gives_up_at_its_bound(backend: Backend) -> None:
    t = backend.make("t")
    with pytest.raises(asyncio.TimeoutError):
        await t.wait_connected(0.05)  # never entered: nothing connects it
    await t.close()
