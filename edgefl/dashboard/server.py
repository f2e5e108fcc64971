"""The dashboard's HTTP server: the page, its assets, the fleet as JSON and as events.

Plain asyncio streams, GET only, bounded requests and a bounded number of event
streams; it reads the monitor's state under its lock and never publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from importlib import resources
from typing import Any

from ..monitor.state import FleetState
from ..supervise import bounded, wait_event
from .summary import summary

log = logging.getLogger(__name__)

#: Path -> (asset file, content type). Nothing else is served from the package.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 10.0
MAX_STREAMS = 32
KEEPALIVE_S = 15.0


def asset(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


class DashboardServer:
    """Serves ``state`` (read under ``lock``) on ``host:port`` until cancelled.

    ``/events`` is a server-sent event stream: the fleet's summary at once, then
    again whenever a message changed the state, checked every ``interval_s``.
    """

    def __init__(
        self,
        state: FleetState,
        lock: threading.Lock,
        host: str = "127.0.0.1",
        port: int = 8088,
        *,
        interval_s: float = 0.5,
    ) -> None:
        self.state, self.lock = state, lock
        self.host, self.port = host, port
        self.interval_s = interval_s
        self.assets = {path: (asset(name), kind) for path, (name, kind) in ASSETS.items()}
        self.streams = 0
        self._document: tuple[int, bytes] = (-1, b"")
        self._closing = asyncio.Event()
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def serve(self, ready: Callable[[int], None] | None = None) -> None:
        """Listen until cancelled; ``ready(port)`` once the socket is bound."""
        server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=MAX_REQUEST_BYTES
        )
        async with server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("dashboard on http://%s:%d/", self.host, self.port)
            if ready is not None:
                ready(self.port)
            try:
                await server.serve_forever()
            finally:
                await self._close_connections()

    async def _close_connections(self) -> None:
        """End the event streams, then cut what is still open; every handler returns."""
        self._closing.set()
        for attempt in range(2):
            tasks = list(self._connections)
            if not tasks:
                return
            if attempt:
                for writer in self._connections.values():
                    writer.transport.abort()
            await asyncio.wait(tasks, timeout=1.0)

    def document(self) -> bytes:
        """The summary as JSON, built once per change of the state, for every stream."""
        with self.lock:
            if self._document[0] != self.state.messages:
                body = json.dumps(summary(self.state), sort_keys=True).encode()
                self._document = (self.state.messages, body)
            return self._document[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            method, path = await self._request(reader)
            await self._respond(method, path, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away or sent too much: nothing to answer
        except TimeoutError:
            await self._send(writer, 408, b"request timeout\n", "text/plain")
        except ValueError:
            await self._send(writer, 400, b"bad request\n", "text/plain")
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _request(reader: asyncio.StreamReader) -> tuple[str, str]:
        head = b""

        async def read() -> None:
            nonlocal head  # bounded by the reader's limit: LimitOverrunError
            head = await reader.readuntil(b"\r\n\r\n")

        if not await bounded(read(), REQUEST_TIMEOUT_S):
            raise TimeoutError("no request head in time")
        method, path, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        return method, path.split("?", 1)[0]

    async def _respond(
        self, method: str, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if method != "GET":
            await self._send(writer, 405, b"GET only\n", "text/plain")
        elif path in self.assets:
            body, kind = self.assets[path]
            await self._send(writer, 200, body, kind)
        elif path == "/fleet.json":
            await self._send(writer, 200, self.document(), "application/json")
        elif path == "/events":
            await self._events(reader, writer)
        else:
            await self._send(writer, 404, b"not found\n", "text/plain")

    async def _events(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.streams >= MAX_STREAMS:
            await self._send(writer, 503, b"too many event streams\n", "text/plain")
            return
        self.streams += 1
        try:
            writer.write(self._head(200, "text/event-stream", None, "Cache-Control: no-cache"))
            seen, quiet = -1, 0.0
            # A page that goes away closes its end (EOF); the server's end sets _closing.
            while not (reader.at_eof() or self._closing.is_set()):
                with self.lock:
                    messages = self.state.messages
                if messages != seen:
                    seen, quiet = messages, 0.0
                    writer.write(b"data: " + self.document() + b"\n\n")
                elif quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    writer.write(b": keep-alive\n\n")
                await writer.drain()
                await wait_event(self._closing, self.interval_s)
                quiet += self.interval_s
        finally:
            self.streams -= 1

    async def _send(self, writer: asyncio.StreamWriter, code: int, body: bytes, kind: str) -> None:
        writer.write(self._head(code, kind, len(body)) + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    @staticmethod
    def _head(code: int, kind: str, length: int | None, *extra: str) -> bytes:
        lines = [
            f"HTTP/1.1 {code} {HTTPStatus(code).phrase}",
            f"Content-Type: {kind}",
            "Connection: close",
            "X-Content-Type-Options: nosniff",
            # The page loads nothing but its own assets and its own events.
            "Content-Security-Policy: default-src 'self'",
        ]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        lines.extend(extra)
        return ("\r\n".join(lines) + "\r\n\r\n").encode()
