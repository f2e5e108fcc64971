"""Draining the outbox with a fake transport: order, window, ack only after PUBACK."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edgefl.device import Uploader
from edgefl.outbox import Outbox
from edgefl.transport import NotConnected, PublishTimeout


class FakeTransport:
    """Acknowledges publishes after a short wait; fails the ``fail_at``-th one (1-based)."""

    def __init__(self, fail_at: int | None = None, error: Exception | None = None) -> None:
        self.connected = True
        self.fail_at = fail_at
        self.error = error or NotConnected("gone")
        self.published: list[bytes] = []
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        self.calls += 1
        call = self.calls
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            if call == self.fail_at:
                raise self.error
            self.published.append(payload)
        finally:
            self.in_flight -= 1


def _box(tmp_path: Path, count: int) -> Outbox:
    box = Outbox(tmp_path / "outbox.db")
    for i in range(count):
        box.put("edgefl/gw-1/update/dev-1", bytes([i]) * 5000)
    return box


async def test_flush_sends_everything_oldest_first_with_a_capped_window(tmp_path: Path) -> None:
    box, transport = _box(tmp_path, 10), FakeTransport()
    sizes: list[int] = []
    uploader = Uploader(window=4, delay=lambda n: sizes.append(n) or 0.0)
    sent, ms = await uploader.flush(box, transport)  # type: ignore[arg-type]
    assert sent == 10 and ms > 0 and len(box) == 0
    assert transport.published == [bytes([i]) * 5000 for i in range(10)]
    assert transport.most_in_flight == 4
    assert sizes == [5000] * 10
    assert uploader.estimator.samples == 10 and uploader.estimator.kbps is not None


async def test_a_failed_publish_keeps_its_entry_and_stops_the_flush(tmp_path: Path) -> None:
    box = _box(tmp_path, 10)
    transport = FakeTransport(fail_at=6, error=PublishTimeout("no PUBACK"))
    uploader = Uploader(window=4)
    sent, _ = await uploader.flush(box, transport)  # type: ignore[arg-type]
    # First window all acked; in the second, entry 6 failed and the flush stopped there.
    assert sent == 7 and uploader.failed == 1
    left = box.peek(limit=10)
    assert [e.payload[0] for e in left] == [5, 8, 9]
    assert [e.attempts for e in left] == [1, 0, 0]
    sent, _ = await uploader.flush(box, FakeTransport())  # type: ignore[arg-type]
    assert sent == 3 and len(box) == 0


async def test_nothing_is_attempted_while_disconnected(tmp_path: Path) -> None:
    box, transport = _box(tmp_path, 3), FakeTransport()
    transport.connected = False
    assert (await Uploader().flush(box, transport))[0] == 0  # type: ignore[arg-type]
    assert (await Uploader().flush(box, None))[0] == 0
    assert transport.calls == 0 and len(box) == 3
