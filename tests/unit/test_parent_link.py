"""A node's sync delivery drains its outbox through the one Uploader a device uses too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from timeouts import within

from edgefl.aggregator.parent import ParentLink
from edgefl.aggregator.sync import ParentSync
from edgefl.topics import Topics
from edgefl.transport import NotConnected, PublishTimeout


class FlakyTransport:
    """Connected; the publishes numbered in ``fail`` (1-based) time out or drop the link."""

    def __init__(self, fail: dict[int, Exception]) -> None:
        self.connected = True
        self.fail = fail
        self.calls = 0
        self.published: list[bytes] = []
        self._up = asyncio.Event()
        self._up.set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        await self._up.wait()

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        if not self.connected:
            raise NotConnected("gone")
        self.calls += 1
        await asyncio.sleep(0)
        error = self.fail.get(self.calls)
        if error is not None:
            if isinstance(error, NotConnected):
                self.connected = False
                self._up.clear()
                asyncio.get_running_loop().call_later(0.05, self._reconnect)
            raise error
        self.published.append(payload)

    def _reconnect(self) -> None:
        self.connected = True
        self._up.set()


def _link(tmp_path: Path, transport: FlakyTransport) -> ParentLink:
    sync = ParentSync({"w": np.zeros(3, np.float32)}, 0)
    link = ParentLink(
        node="gw-1",
        parent="cloud",
        topics=Topics(),
        transport=transport,  # type: ignore[arg-type]
        sync=sync,
        retry_s=0.01,
    )
    link.open(tmp_path / "sync.sqlite")
    return link


async def _deliver(link: ParentLink, *payloads: bytes) -> None:
    for i, payload in enumerate(payloads):
        await link.store({"seq": i, "topic": link.topic, "payload": payload})
    flusher = asyncio.ensure_future(link.flush())
    try:
        async with within(10):
            while link.buffered or not link.idle.is_set():
                await asyncio.sleep(0.01)
    finally:
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)


async def test_a_sync_whose_publish_times_out_is_counted_and_delivered_on_the_next_try(
    tmp_path: Path,
) -> None:
    transport = FlakyTransport({1: PublishTimeout("no PUBACK")})
    link = _link(tmp_path, transport)
    await _deliver(link, b"sync-0")
    assert transport.published == [b"sync-0"] and transport.calls == 2
    assert link.uploader.failed == 1 and link.uploader.sent == 1
    assert link.buffered == 0
    link.close()


async def test_syncs_stored_while_the_link_drops_all_arrive_once(tmp_path: Path) -> None:
    transport = FlakyTransport({2: NotConnected("dropped")})
    link = _link(tmp_path, transport)
    await _deliver(link, b"sync-0", b"sync-1", b"sync-2")
    assert sorted(transport.published) == [b"sync-0", b"sync-1", b"sync-2"]
    assert link.uploader.failed == 1 and link.buffered == 0
    link.close()
