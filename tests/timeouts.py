"""``within(seconds)``: ``asyncio.timeout`` for the tests, on Python 3.10 as well.

On 3.11+ it is ``asyncio.timeout`` itself; on 3.10 a small stand-in that cancels
the waiting task at the deadline and raises the built-in ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager


@asynccontextmanager
async def _within_310(seconds: float) -> AsyncIterator[None]:
    task = asyncio.current_task()
    assert task is not None, "within() needs a running task"
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        yield
    except asyncio.CancelledError:
        if expired:
            raise TimeoutError(f"not done within {seconds}s") from None
        raise
    finally:
        handle.cancel()


def within(seconds: float) -> AbstractAsyncContextManager[None]:
    """Bound the block to ``seconds``; ``TimeoutError`` when it runs over."""
    if sys.version_info >= (3, 11):
        return asyncio.timeout(seconds)  # novermin: only reached on 3.11+
    return _within_310(seconds)
