"""Sibling tasks with one owner: results in order, and a failure cancels the rest."""

from __future__ import annotations

import asyncio

import pytest

from edgefl.supervise import all_completed


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
