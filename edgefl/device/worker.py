"""Training off the event loop: one daemon thread per run, stopped by a flag on cancellation.

Not the default executor: a task that ignores the flag must not hold the
process at exit. The event loop only ever waits on a future here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


async def run_stoppable(
    fn: Callable[[], T], stop: threading.Event, *, name: str, wait_s: float
) -> T:
    """Run ``fn`` in a daemon thread and return its result.

    If the caller is cancelled, ``stop`` is set (``fn`` is expected to poll it)
    and the thread gets ``wait_s`` seconds to end before the cancellation goes on.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def target() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:  # handed over to the awaiting task
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name=name, daemon=True).start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([future], timeout=wait_s)
        if future.done():
            future.exception()  # a stopped run ends in TrainingStopped: nothing to report
        else:
            log.warning("%s ignored the stop for %.0f s; left to finish on its own", name, wait_s)
        raise
