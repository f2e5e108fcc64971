"""Draining the outbox with a fake transport: order, window, delivery, receipts, resends."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from edgefl.delivery import RESEND_MIN_S, Uploader
from edgefl.outbox import DiskFull, Outbox
from edgefl.transport import NotConnected, PublishTimeout
from edgefl.wire import Announcement, TrainConfig

DEV = "dev-1"
TOPIC = "edgefl/gw-1/update/dev-1"


class FakeTransport:
    """Acknowledges publishes after a short wait; fails the ``fail_at``-th one (1-based),
    dropping the connection if ``disconnect``; the ``slow_at``-th waits ``slow_s``, then fails.
    """

    def __init__(
        self,
        fail_at: int | None = None,
        error: Exception | None = None,
        *,
        disconnect: bool = False,
        slow_at: int | None = None,
        slow_s: float = 0.0,
    ) -> None:
        self.connected = True
        self.fail_at, self.slow_at, self.slow_s = fail_at, slow_at, slow_s
        self.disconnect = disconnect
        self.error = error or NotConnected("gone")
        self.published: list[bytes] = []
        self.done_at: dict[int, float] = {}
        self.calls = 0
        self.refused = 0  # publishes tried after the connection was gone
        self.failed_at: float | None = None
        self.in_flight = 0
        self.most_in_flight = 0

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        if not self.connected:
            self.refused += 1
            raise NotConnected("gone")
        self.calls += 1
        call = self.calls
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.slow_s if call == self.slow_at else 0.01)
            if call in (self.fail_at, self.slow_at):
                self.connected = not self.disconnect
                self.failed_at = asyncio.get_running_loop().time()
                raise self.error
            self.published.append(payload)
            self.done_at[call] = asyncio.get_running_loop().time()
        finally:
            self.in_flight -= 1


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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


async def test_a_failed_publish_keeps_its_entry_and_the_ones_behind_it_still_go(
    tmp_path: Path,
) -> None:
    box = _box(tmp_path, 10)
    transport = FakeTransport(fail_at=6, error=PublishTimeout("no PUBACK"))
    uploader = Uploader(window=4)
    sent, _ = await uploader.flush(box, transport)  # type: ignore[arg-type]
    assert sent == 9 and uploader.failed == 1
    (left,) = box.peek(limit=10)
    assert (left.payload[0], left.attempts) == (5, 1)
    sent, _ = await uploader.flush(box, FakeTransport())  # type: ignore[arg-type]
    assert sent == 1 and len(box) == 0


async def test_a_lost_connection_ends_the_flush_and_keeps_the_rest(tmp_path: Path) -> None:
    box = _box(tmp_path, 10)
    transport = FakeTransport(fail_at=6, disconnect=True)
    sent, _ = await Uploader(window=4).flush(box, transport)  # type: ignore[arg-type]
    # Those in flight when it dropped (up to three beside the sixth, how many depends on
    # how far the outbox reads had got) finished; none started after it was gone.
    assert transport.refused == 0 and 6 <= transport.calls <= 9
    assert sent == len(transport.published) == transport.calls - 1
    left = [e.payload[0] for e in box.peek(limit=10)]
    assert left == [5, *range(transport.calls, 10)]


async def test_a_publish_waiting_for_its_puback_does_not_hold_back_the_entries_behind_it(
    tmp_path: Path,
) -> None:
    box = _box(tmp_path, 10)
    transport = FakeTransport(slow_at=1, slow_s=1.0, error=PublishTimeout("no PUBACK"))
    sent, _ = await Uploader(window=4).flush(box, transport)  # type: ignore[arg-type]
    assert sent == 9
    # The other nine went out through the three other slots while the first waited.
    assert transport.failed_at is not None
    assert max(transport.done_at.values()) < transport.failed_at
    assert [e.attempts for e in box.peek()] == [1]


# ------------------------------------------------------------- receipts


def _updates(tmp_path: Path, count: int, clock: Clock | None = None, **caps: int) -> Outbox:
    box = Outbox(tmp_path / "outbox.db", clock=clock or Clock(), **caps)
    for _ in range(count):
        box.put_with_seq(DEV, TOPIC, lambda seq: b"update-%d" % seq)
    return box


def _announcement(
    receipts: dict[str, tuple[int, int]] | None = None, deadline_s: float = 30
) -> Announcement:
    return Announcement(
        sender="gw-1",
        version=1,
        round=1,
        config=TrainConfig(deadline_s=deadline_s),
        receipts=receipts or {},
    )


async def test_a_puback_is_not_delivery_only_the_nodes_receipt_forgets_an_update(
    tmp_path: Path,
) -> None:
    box, transport, uploader = _updates(tmp_path, 3), FakeTransport(), Uploader()
    assert (await uploader.flush(box, transport))[0] == 3  # type: ignore[arg-type]
    assert (len(box), box.backlog().unreceipted) == (0, 3)
    uploader.note(_announcement({DEV: (box.incarnation, 1), "dev-9": (box.incarnation, 7)}), DEV)
    await uploader.flush(box, transport)  # type: ignore[arg-type]
    assert [e.seq for e in box.peek()] == [2] and uploader.settled == 2
    uploader.note(_announcement({DEV: (box.incarnation + 1, 2)}), DEV)  # another incarnation's
    await uploader.flush(box, None)
    assert [e.seq for e in box.peek()] == [2]
    assert transport.published == [b"update-0", b"update-1", b"update-2"]


async def test_every_new_session_sends_the_unreceipted_updates_again(tmp_path: Path) -> None:
    box, transport, uploader = _updates(tmp_path, 3), FakeTransport(), Uploader()
    await uploader.flush(box, transport)  # type: ignore[arg-type]
    await uploader.flush(box, transport)  # type: ignore[arg-type]
    assert len(transport.published) == 3  # the same session: nothing is due
    box.clock.now += 0.5  # type: ignore[attr-defined]
    uploader.new_session()  # a reconnect: the broker may have lost what it acknowledged
    assert (await uploader.flush(box, transport))[0] == 3  # type: ignore[arg-type]
    assert transport.published[3:] == [b"update-0", b"update-1", b"update-2"]
    assert [e.deliveries for e in box.peek()] == [2, 2, 2]


async def test_an_update_whose_receipt_is_late_goes_again_after_a_round_then_backs_off(
    tmp_path: Path,
) -> None:
    clock = Clock()
    box, transport, uploader = _updates(tmp_path, 1, clock), FakeTransport(), Uploader()
    uploader.note(_announcement(deadline_s=10), DEV)
    for step, expected in [(0, 1), (9.9, 1), (0.1, 2), (19.9, 2), (0.1, 3)]:
        clock.now += step
        await uploader.flush(box, transport)  # type: ignore[arg-type]
        assert len(transport.published) == expected, (clock.now, expected)
    uploader.note(_announcement(deadline_s=1), DEV)
    assert uploader.resend_s == RESEND_MIN_S  # never more often than this


async def test_a_node_that_sends_no_receipts_cannot_grow_the_outbox_past_its_caps(
    tmp_path: Path,
) -> None:
    box, transport, uploader = _updates(tmp_path, 0, max_entries=5), FakeTransport(), Uploader()
    for _ in range(20):
        box.put_with_seq(DEV, TOPIC, lambda seq: b"update-%d" % seq)
        await uploader.flush(box, transport)  # type: ignore[arg-type]
    assert [e.seq for e in box.peek(100)] == [15, 16, 17, 18, 19]
    assert (box.evicted, box.dropped, len(transport.published)) == (15, 0, 20)


class Spy:
    """An outbox whose every call records the thread it ran on; ``full`` makes marks fail."""

    def __init__(self, inner: Outbox, full: bool = False) -> None:
        self.inner, self.full, self.threads = inner, full, set[int]()

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.inner, name)
        if name == "clock":  # no sqlite behind it
            return call

        def spied(*args: Any, **kwargs: Any) -> Any:
            self.threads.add(threading.get_ident())
            if self.full and name.startswith("mark"):
                raise DiskFull("database or disk is full")
            return call(*args, **kwargs)

        return spied


async def test_the_outbox_is_used_from_worker_threads_never_the_event_loop(
    tmp_path: Path,
) -> None:
    spy, uploader = Spy(_updates(tmp_path, 3)), Uploader()
    await uploader.flush(spy, FakeTransport(fail_at=2))  # type: ignore[arg-type]
    uploader.note(_announcement({DEV: (spy.inner.incarnation, 0)}), DEV)
    await uploader.flush(spy, None)  # type: ignore[arg-type]
    assert spy.threads and threading.get_ident() not in spy.threads
    assert [e.seq for e in spy.inner.peek()] == [1, 2]


async def test_a_full_disk_when_marking_leaves_the_entry_to_be_sent_again(
    tmp_path: Path,
) -> None:
    spy, transport = Spy(_updates(tmp_path, 2), full=True), FakeTransport()
    uploader = Uploader()
    assert (await uploader.flush(spy, transport))[0] == 2  # type: ignore[arg-type]
    assert len(spy.inner) == 2  # not marked delivered: the next flush sends them again
    spy.full = False
    assert (await uploader.flush(spy, transport))[0] == 2  # type: ignore[arg-type]
    assert (len(spy.inner), spy.inner.backlog().unreceipted) == (0, 2)


async def test_nothing_is_attempted_while_disconnected(tmp_path: Path) -> None:
    box, transport = _box(tmp_path, 3), FakeTransport()
    transport.connected = False
    assert (await Uploader().flush(box, transport))[0] == 0  # type: ignore[arg-type]
    assert (await Uploader().flush(box, None))[0] == 0
    assert transport.calls == 0 and len(box) == 3
