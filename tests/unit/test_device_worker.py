"""Training off the event loop: results come back, and a cancellation stops the thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from edgefl.device.worker import run_stoppable
from edgefl.tasks import load_task
from edgefl.tasks.training import TrainingStopped, accepts_should_stop
from edgefl.wire import TrainConfig


async def test_the_result_comes_back_and_the_loop_stays_responsive() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(ticker())
    result = await run_stoppable(
        lambda: time.sleep(0.3) or 42, threading.Event(), name="t", wait_s=1
    )
    beat.cancel()
    assert result == 42 and ticks >= 10


async def test_cancelling_sets_the_flag_and_waits_for_the_thread() -> None:
    stop = threading.Event()
    finished = threading.Event()

    def work() -> None:
        while not stop.wait(0.01):
            pass
        finished.set()
        raise TrainingStopped("asked to")

    job = asyncio.create_task(run_stoppable(work, stop, name="t", wait_s=5))
    await asyncio.sleep(0.1)
    start = time.monotonic()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert finished.is_set() and time.monotonic() - start < 1


async def test_errors_of_the_work_reach_the_caller() -> None:
    def boom() -> None:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        await run_stoppable(boom, threading.Event(), name="t", wait_s=1)


def test_digits_training_stops_between_steps_when_asked() -> None:
    task = load_task("digits")
    assert accepts_should_stop(task.train)
    assert not accepts_should_stop(lambda params, data, cfg: None)
    asked = 0

    def should_stop() -> bool:
        nonlocal asked
        asked += 1
        return asked > 3

    data = task.device_data(0, 4)
    with pytest.raises(TrainingStopped, match="after 3 steps"):
        task.train(task.init_params(), data, TrainConfig(epochs=50), should_stop=should_stop)
