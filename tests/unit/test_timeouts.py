"""The tests' bounded wait behaves as ``asyncio.timeout`` does, on every Python."""

from __future__ import annotations

import asyncio

import pytest
from timeouts import within


async def test_within_raises_timeout_error_at_its_bound() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        async with within(0.05):
            await asyncio.sleep(10)
    assert 0.04 < loop.time() - start < 1


async def test_within_returns_in_time_and_passes_a_cancellation_on() -> None:
    async with within(1):
        await asyncio.sleep(0)

    async def guarded() -> None:
        async with within(10):
            await asyncio.sleep(10)

    task = asyncio.ensure_future(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
