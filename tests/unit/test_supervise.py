"""Sibling tasks with one owner: results in order, and a failure cancels the rest."""

from __future__ import annotations

import asyncio

import pytest

from edgefl.supervise import all_completed, bounded


async def test_all_completed_returns_every_result_in_order() -> None:
    async def after(delay: float, value: int) -> int:
        await asyncio.sleep(delay)
        return value

    assert await all_completed(after(0.02, 1), after(0.0, 2), after(0.01, 3)) == [1, 2, 3]


async def test_all_completed_cancels_the_others_when_one_fails() -> None:
    cancelled: list[str] = []

    async def slow(name: str) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def fail() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("one failed")

    with pytest.raises(ValueError, match="one failed"):
        await all_completed(slow("a"), fail(), slow("b"))
    assert sorted(cancelled) == ["a", "b"]


async def test_bounded_returns_true_when_the_work_finishes_in_time() -> None:
    done: list[int] = []

    async def work() -> None:
        done.append(1)

    assert await bounded(work(), 1.0) is True and done == [1]


async def test_bounded_cancels_late_work_and_returns_false() -> None:
    cancelled = asyncio.Event()

    async def late() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    assert await bounded(late(), 0.01) is False and cancelled.is_set()


async def test_bounded_raises_the_failure_of_the_work() -> None:
    async def broken() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await bounded(broken(), 1.0)
