"""Structured concurrency for the asyncio shells: sibling tasks with one owner, safe waits.

Every task started here is awaited here; nothing is left running. Python 3.10
has no TaskGroup, and its ``asyncio.wait_for`` can lose a cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def first_completed(*coros: Coroutine[Any, Any, Any]) -> None:
    """Run ``coros`` as tasks owned here; when the first returns or fails, cancel and
    await the others, then re-raise that failure, if any."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def all_completed(*coros: Coroutine[Any, Any, Any]) -> list[Any]:
    """Run ``coros`` as tasks owned here and return their results in order; when one
    fails, cancel and await the others, then re-raise that failure (a TaskGroup)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                task.result()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def bounded(coro: Coroutine[Any, Any, Any], timeout: float) -> bool:
    """Run ``coro`` for at most ``timeout`` seconds; True if it finished in time (its
    failure is raised), False if it was cancelled for being late.

    Not ``asyncio.wait_for``, for the reason given in ``wait_event``.
    """
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if done:
        task.result()
    return bool(done)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it is set.

    Not ``asyncio.wait_for(event.wait(), timeout)``: before Python 3.12 that can
    swallow a cancellation arriving just as the event is set, and a loop built on
    it then never stops.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)
