"""Drains a device's outbox over MQTT: oldest first, a window in flight, ack after PUBACK.

An entry leaves the outbox only once the broker acknowledged it; a lost
connection leaves it for the next flush (the receiver dedupes by sender and seq).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..outbox import Entry, Outbox
from ..profiles import UplinkEstimator
from ..transport import NotConnected, Transport

log = logging.getLogger(__name__)

#: What a publish raises when the entry must stay buffered: offline, or no PUBACK in time.
LOST = (NotConnected, TimeoutError, asyncio.TimeoutError)


class Uploader:
    """Flushes an outbox through whichever transport is current; one flush at a time.

    Both are passed per flush: a device's session changes with its link, and a
    caller may wrap the outbox (the simulator counts what it buffers).
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
        self.sent = 0
        self.failed = 0

    async def flush(self, outbox: Outbox, transport: Transport | None) -> tuple[int, float]:
        """Publish until the outbox is empty or a publish fails: ``(entries sent, ms)``."""
        sent = 0
        start = time.perf_counter()
        async with self._lock:
            while transport is not None and transport.connected:
                batch = outbox.peek(limit=self.window)
                if not batch:
                    break
                results = await asyncio.gather(*(self._send(outbox, transport, e) for e in batch))
                sent += sum(results)
                if not all(results):
                    break
        self.sent += sent
        return sent, (time.perf_counter() - start) * 1000.0

    async def _send(self, outbox: Outbox, transport: Transport, entry: Entry) -> bool:
        start = time.perf_counter()
        try:
            if self._delay is not None:
                await asyncio.sleep(self._delay(len(entry.payload)))
            await transport.publish(entry.topic, entry.payload, qos=1)
        except LOST as exc:
            log.debug("outbox entry %d stays buffered: %s", entry.id, exc)
            outbox.mark_attempt(entry.id)
            self.failed += 1
            return False
        outbox.ack(entry.id)
        self.estimator.record(len(entry.payload), time.perf_counter() - start)
        return True
