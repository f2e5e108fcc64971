"""The dashboard's summary of a FleetState and its HTTP server, on loopback, no broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
from collections.abc import AsyncIterator
from importlib import resources

import pytest
from timeouts import within

from edgefl.cli import build_parser
from edgefl.dashboard import DashboardServer, summary
from edgefl.dashboard.server import ASSETS, MAX_REQUEST_BYTES, MAX_STREAMS
from edgefl.monitor import FleetState
from edgefl.topics import Topics
from edgefl.wire import Status, encode_metrics, encode_status

T = Topics()


def fleet() -> FleetState:
    state = FleetState()
    for topic, payload in (
        (T.status("cloud", "gw-1"), encode_status(Status(id="gw-1", role="gateway", online=True))),
        (T.status("gw-1", "dev-1"), encode_status(Status(
            id="dev-1", online=True, battery=0.42, link="wifi", eligible=False,
            reason="battery_low"))),
        (T.status("gw-2", "dev-2"), encode_status(Status(id="dev-2", online=False))),
        (T.metrics("cloud", "cloud"), encode_metrics("cloud", "cloud", {
            "round": 3, "version": 4, "participants": 1, "selected": 2, "accuracy": 0.75,
            "bytes_in": 100})),
        (T.metrics("cloud", "cloud"), encode_metrics("cloud", "cloud", {
            "round": 4, "version": 5, "participants": 2, "selected": 2, "accuracy": 0.875,
            "bytes_in": 300})),
        (T.metrics("gateway", "gw-1"), encode_metrics("gateway", "gw-1", {
            "round": 9, "version": 10, "participants": 1, "selected": 1, "bytes_in": 40,
            "bytes_down": 7, "clipped": 1, "clip_bound": 2.5, "rejected_stale": 2,
            "rejected_norm": 1, "rejected_shape": 0, "rejected_total": 3})),
        (T.metrics("gateway", "gw-2"), encode_metrics("gateway", "gw-2", {
            "bytes_in": 2, "rejected_stale": 0})),
        (T.metrics("device", "dev-1"), encode_metrics("device", "dev-1", {"round": 9})),
    ):  # fmt: skip
        assert state.apply(topic, payload)
    return state


def test_summary_nests_gateways_under_the_cloud_and_devices_under_their_gateway() -> None:
    doc = summary(fleet())
    cloud, gw2 = doc["tree"]
    assert (cloud["id"], cloud["role"], cloud["round"], cloud["accuracy"]) == (
        "cloud", "cloud", 4, 0.875)  # fmt: skip
    gateways = {g["id"]: g for g in cloud["children"]}
    assert set(gateways) == {"gw-1"}  # gw-2 never said who its parent is
    (dev1,) = gateways["gw-1"]["devices"]
    assert (dev1["id"], dev1["online"], dev1["battery"], dev1["link"]) == ("dev-1", True, 0.42,
                                                                            "wifi")  # fmt: skip
    assert (dev1["eligible"], dev1["reason"], dev1["last_round"]) == (False, "battery_low", 9)
    # gw-2 never said who its parent is: a root of its own, with its device
    assert (gw2["id"], [d["id"] for d in gw2["devices"]]) == ("gw-2", ["dev-2"])
    assert json.dumps(doc)  # plain data


def test_summary_figures_per_version_participation_bytes_rejections_and_clipping() -> None:
    doc = summary(fleet())
    assert doc["accuracy"] == {"cloud": [[4, 0.75], [5, 0.875]]}
    assert doc["participation"]["cloud"] == {"round": 4, "participants": 2, "selected": 2}
    assert doc["participation"]["gw-1"] == {"round": 9, "participants": 1, "selected": 1}
    assert doc["bytes"] == {"cloud": {"bytes_in": 300}, "gateway": {"bytes_in": 42,
                                                                     "bytes_down": 7}}  # fmt: skip
    assert doc["rejected"] == {"gw-1": {"norm": 1, "stale": 2}}
    assert doc["clipping"] == {"gw-1": {"clipped": 1, "clip_bound": 2.5}}


def test_a_parent_cycle_claimed_by_statuses_is_drawn_without_looping() -> None:
    state = FleetState()
    for node, parent in (("gw-a", "gw-b"), ("gw-b", "gw-a"), ("gw-c", "gw-c")):
        state.apply(
            T.status(parent, node), encode_status(Status(id=node, role="gateway", online=True))
        )
    doc = summary(state)
    assert sorted(e["id"] for e in doc["tree"]) == ["gw-a", "gw-b", "gw-c"]
    assert json.dumps(doc)


def test_a_device_of_an_unknown_gateway_shows_under_that_gateway() -> None:
    state = FleetState()
    state.apply(T.status("gw-9", "dev-9"), encode_status(Status(id="dev-9", online=True)))
    (gw,) = summary(state)["tree"]
    assert (gw["id"], gw["online"], [d["id"] for d in gw["devices"]]) == ("gw-9", None, ["dev-9"])


def test_the_page_loads_only_its_own_assets() -> None:
    static = resources.files("edgefl.dashboard").joinpath("static")
    names = {name for name, _ in ASSETS.values()}
    assert names == {p.name for p in static.iterdir()}
    for name in names:
        text = static.joinpath(name).read_text()
        text = text.replace('"http://www.w3.org/2000/svg"', "")  # a namespace, not a load
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), name
    html = static.joinpath("index.html").read_text()
    assert set(re.findall(r'(?:src|href)="([^"]+)"', html)) == set(ASSETS) - {"/"}


def test_the_document_is_built_once_per_change_of_the_state() -> None:
    state = fleet()
    server = DashboardServer(state, threading.Lock())
    first = server.document()
    assert server.document() is first and json.loads(first) == summary(state)
    state.apply(T.metrics("cloud", "cloud"), encode_metrics("cloud", "cloud", {"round": 5}))
    second = server.document()
    assert second is not first and json.loads(second)["participation"]["cloud"]["round"] == 5


def test_dashboard_flags_bind_loopback_by_default() -> None:
    args = build_parser().parse_args(["dashboard", "--broker", "h:1"])
    assert (args.host, args.port, args.broker) == ("127.0.0.1", 8088, "h:1")


# ---------------------------------------------------------------- server


@contextlib.asynccontextmanager
async def serving(state: FleetState) -> AsyncIterator[DashboardServer]:
    server = DashboardServer(state, threading.Lock(), port=0, interval_s=0.05)
    bound = asyncio.Event()
    task = asyncio.ensure_future(server.serve(lambda _: bound.set()))
    try:
        async with within(10):
            await bound.wait()
        yield server
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def request(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        async with within(10):
            data = await reader.read()
    finally:
        writer.close()
    if not data:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def get(port: int, path: str) -> tuple[int, bytes]:
    return await request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


async def test_server_serves_the_page_its_assets_and_the_summary() -> None:
    state = fleet()
    async with serving(state) as server:
        code, html = await get(server.port, "/")
        assert code == 200 and b'<ul id="tree"' in html
        for path in ("/dashboard.js", "/dashboard.css"):
            assert (await get(server.port, path))[0] == 200
        code, body = await get(server.port, "/fleet.json?x=1")
        assert code == 200 and json.loads(body) == summary(state)
        assert (await get(server.port, "/../etc/passwd"))[0] == 404
        assert (await request(server.port, b"POST / HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await request(server.port, b"GARBAGE\r\n\r\n"))[0] == 400
        # A request head over the bound gets no answer, and the server keeps serving.
        assert await request(server.port, b"GET /" + b"a" * MAX_REQUEST_BYTES) == (0, b"")
        assert (await get(server.port, "/"))[0] == 200


async def test_events_send_the_summary_at_once_and_again_on_every_change() -> None:
    state = fleet()
    async with serving(state) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /events HTTP/1.1\r\n\r\n")
        async with within(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"200 OK" in head and b"text/event-stream" in head
            first = json.loads((await reader.readuntil(b"\n\n"))[len(b"data: ") :])
            assert first == summary(fleet())
            state.apply(T.metrics("cloud", "cloud"), encode_metrics("cloud", "cloud", {
                "round": 5, "version": 6, "accuracy": 0.9}))  # fmt: skip
            second = json.loads((await reader.readuntil(b"\n\n"))[len(b"data: ") :])
        assert second["accuracy"]["cloud"][-1] == [6, 0.9]
        writer.close()


async def test_event_streams_are_bounded_in_number() -> None:
    async with serving(fleet()) as server:
        streams = []
        for _ in range(MAX_STREAMS):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /events HTTP/1.1\r\n\r\n")
            async with within(10):
                await reader.readuntil(b"\r\n\r\n")  # the head
                await reader.readuntil(b"\n\n")  # the first summary
            streams.append(writer)
        assert (await get(server.port, "/events"))[0] == 503
        for writer in streams:
            writer.close()
        async with within(10):
            while server.streams:
                await asyncio.sleep(0.05)
        code, _ = await get(server.port, "/fleet.json")
        assert code == 200


@pytest.mark.parametrize("argv", [["--broker", "no-port"], ["--port", "70000"]])
def test_dashboard_refuses_bad_flags_in_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefl.cli import main

    assert main(["dashboard", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgefl dashboard: error:") and "\n" not in err


def test_dashboard_on_a_busy_port_exits_2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from edgefl.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["dashboard", "--broker", "127.0.0.1:1", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"edgefl dashboard: error: 127.0.0.1:{port}:") and "\n" not in err
