"""Drains an outbox over MQTT, oldest first, a window in flight: the one drainer of both tiers.

A PUBACK only says the broker has the update, not that a node will fold it (none
may be subscribed; a broker restarted without persistence has lost it). So a
device's entry (stored with its seq) is marked delivered at its PUBACK and
forgotten at the receipt a Model from its gateway carries; until then it is
published again on every new MQTT session and whenever its receipt is late. The
node folds each (sender, inc, seq) once. An entry stored without a seq (a node's
sync, whose receipt ``aggregator.sync`` tracks) leaves at its PUBACK.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .outbox import DiskFull, Entry, Outbox
from .profiles import UplinkEstimator
from .transport import LOST, AnyTransport
from .wire import Announcement, TrainConfig

log = logging.getLogger(__name__)

#: A delivered update's receipt is late after a round's deadline (``config.deadline_s``
#: of the latest Model), at least this long; each resend doubles the wait.
RESEND_MIN_S = 5.0


class Uploader:
    """Flushes an outbox through whichever transport is current; one flush at a time.

    Both are passed per flush: a device's session changes with its link, and a
    caller may wrap the outbox (the simulator counts what it buffers). The agent
    calls ``new_session`` on every MQTT connect and ``note`` with every Model.
    """

    def __init__(
        self,
        *,
        window: int = 8,
        estimator: UplinkEstimator | None = None,
        delay: Callable[[int], float] | None = None,
    ) -> None:
        self.window = window
        self.estimator = estimator or UplinkEstimator()
        self._delay = delay
        self._lock = asyncio.Lock()
        #: seconds a delivered update waits for its receipt before it is sent again.
        self.resend_s = max(TrainConfig().deadline_s, RESEND_MIN_S)
        self._receipt: tuple[str, int, int] | None = None
        self._fresh_session = True
        self._since = 0.0  # when the current session's first flush began (outbox clock)
        self.sent = 0
        self.failed = 0
        self.settled = 0

    def note(self, model: Announcement, sender: str) -> None:
        """An Announcement from the gateway: its round length, and ``sender``'s receipt if it has
        one (the next flush forgets what it covers)."""
        self.resend_s = max(model.config.deadline_s, RESEND_MIN_S)
        receipt = model.receipts.get(sender)
        if receipt is not None:
            self._receipt = (sender, *receipt)

    def new_session(self) -> None:
        """A new MQTT session: what the last one delivered may be lost, so send it again."""
        self._fresh_session = True

    async def flush(self, outbox: Outbox, transport: AnyTransport | None) -> tuple[int, float]:
        """Publish what is due, a window in flight: ``(entries acknowledged, ms)``.

        A publish that fails or times out is counted on its entry and does not hold
        back the ones behind it; a lost connection ends the flush.
        """
        start = time.perf_counter()
        sent = 0
        async with self._lock:
            await self._settle(outbox)
            if transport is not None and transport.connected:
                if self._fresh_session:
                    self._fresh_session = False
                    self._since = outbox.clock()
                sent = await self._drain(outbox, transport)
        self.sent += sent
        return sent, (time.perf_counter() - start) * 1000.0

    async def _settle(self, outbox: Outbox) -> None:
        receipt = self._receipt
        if receipt is None:
            return
        try:
            self.settled += await asyncio.to_thread(outbox.settle, *receipt)
        except DiskFull as exc:  # kept: the next flush tries again
            log.debug("receipt %s not applied yet: %s", receipt, exc)
            return
        if self._receipt == receipt:
            self._receipt = None

    async def _drain(self, outbox: Outbox, transport: AnyTransport) -> int:
        sent, after, exhausted = 0, 0, False
        queue: list[Entry] = []
        running: set[asyncio.Task[bool]] = set()
        try:
            while True:
                while len(running) < self.window and transport.connected:
                    if not queue and not exhausted:
                        queue = await asyncio.to_thread(
                            outbox.due,
                            self.window,
                            resend_after=self.resend_s,
                            since=self._since,
                            after=after,
                        )
                        exhausted = len(queue) < self.window
                    if not queue:
                        break
                    entry = queue.pop(0)
                    after = entry.id
                    running.add(asyncio.ensure_future(self._send(outbox, transport, entry)))
                if not running:
                    return sent
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                sent += sum(task.result() for task in done)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _send(self, outbox: Outbox, transport: AnyTransport, entry: Entry) -> bool:
        start = time.perf_counter()
        try:
            if self._delay is not None:
                await asyncio.sleep(self._delay(len(entry.payload)))
            await transport.publish(entry.topic, entry.payload, qos=1)
        except LOST as exc:
            log.debug("outbox entry %d stays buffered: %s", entry.id, exc)
            self.failed += 1
            await _record(outbox.mark_attempt, entry)
            return False
        self.estimator.record(len(entry.payload), time.perf_counter() - start)
        await _record(outbox.mark_delivered, entry)
        return True


async def _record(mark: Callable[[int], None], entry: Entry) -> None:
    """Mark ``entry`` in a worker thread; a full disk leaves it as it was (sent again later)."""
    try:
        await asyncio.to_thread(mark, entry.id)
    except DiskFull as exc:
        log.debug("outbox entry %d not marked: %s", entry.id, exc)
