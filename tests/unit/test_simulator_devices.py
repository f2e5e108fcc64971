"""Simulated device parts: clock, link delays, energy, attacks, outbox counting, shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefl.config import DeviceSettings
from edgefl.params import l2_norm
from edgefl.profiles import MarkovConnectivity, SimBattery, SimLink, SimProfile, SimReader
from edgefl.simulator import devices
from edgefl.simulator.devices import (
    CountingOutbox,
    DeviceTally,
    LoopRunner,
    NaNEncoder,
    ScaledReader,
    SimClock,
    SimulatedTask,
    TrainingCancelled,
    UplinkDelay,
    always_online,
    warm_up,
)
from edgefl.simulator.scenario import DevicePlan
from edgefl.simulator.workers import split_plans, stop_tasks
from edgefl.tasks import load_task
from edgefl.wire import TrainConfig, Update, decode_update, encode_update


def profile(**kw: object) -> SimProfile:
    fields: dict[str, object] = {
        "battery": SimBattery(capacity_wh=10.0, drain_per_train_s=0.01, drain_per_mb=0.1),
        "link": SimLink(up_kbps=80.0, down_kbps=800.0, latency_ms=100.0),
        "speed": 0.5,
    }
    fields.update(kw)
    return SimProfile(**fields)  # type: ignore[arg-type]


def test_the_clock_runs_time_scale_times_faster() -> None:
    clock = SimClock(time.time() - 2.0, 50.0)
    assert 99.0 <= clock() <= 110.0
    assert clock.real(100.0) == 2.0
    assert SimClock(time.time() + 10, 1.0)() == 0.0


def test_the_uplink_delay_is_the_link_time_scaled_and_drains_the_battery() -> None:
    p = profile()
    delay = UplinkDelay(p, SimClock(time.time(), 10.0))
    # 10 kB at 80 kbit/s is 1 s, plus 0.1 s latency: 1.1 simulated s, 0.11 real s.
    assert delay(10_000) == pytest.approx(0.11)
    assert p.battery is not None
    assert p.battery.level == pytest.approx(1.0 - 0.01 * 0.1)


def test_the_reader_states_the_uplink_per_real_second() -> None:
    p = profile()
    reader = ScaledReader(SimReader(p, lambda: 0.0), 20.0)
    assert reader.read().uplink_kbps == 80.0 * 20
    assert reader.online()


def test_only_profiles_that_can_drop_need_polling() -> None:
    assert always_online(profile(connectivity=None))
    assert always_online(profile(connectivity=MarkovConnectivity(0.0, 1.0)))
    assert not always_online(profile(connectivity=MarkovConnectivity(0.2, 0.2)))


@pytest.fixture(scope="module")
def task():  # type: ignore[no-untyped-def]
    task = load_task("digits", partition="iid", seed=0)
    warm_up(task, 0, 0, 40)  # the first training imports what torch loads lazily
    return task


def test_a_slow_device_trains_in_simulated_time_and_pays_energy(task) -> None:  # type: ignore[no-untyped-def]
    p = profile()
    tally = DeviceTally("d", "g", "c")
    sim = SimulatedTask(task, p, SimClock(time.time(), 1000.0), tally, model_bytes=80_000)
    params = task.init_params(0)
    start = time.perf_counter()
    result = sim.train(params, task.device_data(0, 40), TrainConfig(epochs=1))
    elapsed = time.perf_counter() - start
    assert result.metrics["sim_train_s"] == pytest.approx(tally.sim_train_s)
    real = result.metrics["train_ms"] / 1000
    # Simulated compute is the real compute divided by the speed factor (0.5).
    assert real / 0.5 <= tally.sim_train_s <= elapsed / 0.5
    assert p.battery is not None
    assert p.battery.energy_used_wh == pytest.approx(10.0 * 0.01 * tally.sim_train_s, rel=1e-6)
    # download 80 kB at 800 kbit/s = 0.9 s simulated: under a millisecond at 1000x
    assert elapsed < 2.0


def test_the_scale_attack_multiplies_the_honest_delta(task) -> None:  # type: ignore[no-untyped-def]
    clock = SimClock(time.time(), 1e6)
    data, cfg, params = task.device_data(0, 40), TrainConfig(epochs=1), task.init_params(0)
    honest = SimulatedTask(task, profile(), clock, DeviceTally("a", "g", "c"), model_bytes=1)
    bad = SimulatedTask(
        task, profile(), clock, DeviceTally("b", "g", "c"), model_bytes=1,
        attack="scale", attack_scale=50.0,
    )  # fmt: skip
    good = honest.train(params, data, cfg, seed=3).delta
    scaled = bad.train(params, data, cfg, seed=3).delta
    assert l2_norm(scaled) == pytest.approx(50.0 * l2_norm(good), rel=1e-4)


def test_the_nan_encoder_sends_float32_nans_that_the_codec_rejects() -> None:
    enc = NaNEncoder(DeviceSettings(id="d"))
    tensors = enc.tensors({"w": np.ones((2, 3), np.float32)}, 0)
    update = Update(sender="d", seq=0, round=0, base=0, n=1, tensors=tensors)
    from edgefl.wire import Rejected

    with pytest.raises(Rejected, match="nonfinite"):
        decode_update(encode_update(update))


def test_the_outbox_counts_buffered_updates_and_late_deliveries(tmp_path: Path) -> None:
    tally = DeviceTally("d", "g", "c")
    online = [False]
    with CountingOutbox(tmp_path / "o.db", tally, lambda: online[0]) as box:
        first, _ = box.put_with_seq("d", "t", lambda seq: b"x" * 100)  # offline: buffered
        online[0] = True
        second, _ = box.put_with_seq("d", "t", lambda seq: b"y" * 50)  # sent at once
        third, _ = box.put_with_seq("d", "t", lambda seq: b"z" * 10)
        box.mark_attempt(third)  # its publish failed: buffered
        box.mark_attempt(third)  # counted once
        box.ack(second)
        box.ack(first)
        assert len(box) == 1 and box.backlog().bytes == 10
        assert (tally.updates, tally.buffered, tally.late) == (3, 2, 1)
        assert tally.bytes_up == 150
        box.ack(third)
        assert (tally.buffered, tally.late) == (2, 2)


def test_the_loop_runner_runs_work_on_the_loop_thread() -> None:
    async def main() -> None:
        runner = LoopRunner(asyncio.get_running_loop())
        loop_thread = threading.get_ident()
        seen: list[int] = []

        def work() -> int:
            seen.append(threading.get_ident())
            return 7

        result = await asyncio.to_thread(runner, work)
        assert result == 7 and seen == [loop_thread]

        def boom() -> int:
            raise ValueError("x")

        with pytest.raises(ValueError):
            await asyncio.to_thread(runner, boom)

    asyncio.run(main())


def test_a_queued_training_is_dropped_when_its_device_stops() -> None:
    loop = asyncio.new_event_loop()
    runner = LoopRunner(loop)  # the loop never runs: the work stays queued
    with pytest.raises(TrainingCancelled):
        runner(lambda: 1, stop=lambda: True)
    loop.close()
    with pytest.raises(TrainingCancelled):
        runner(lambda: 1)


def test_workers_get_every_gateway_round_robin() -> None:
    plans = [DevicePlan(f"d{i}", f"g{i // 4}", i, 8, 0, 0) for i in range(8)]
    chunks = split_plans(plans, 2)
    assert [p.shard for p in chunks[0]] == [0, 2, 4, 6]
    assert {p.gateway for p in chunks[1]} == {"g0", "g1"}
    assert len(split_plans(plans[:1], 4)) == 1


def test_stop_tasks_ends_a_loop_that_swallowed_its_cancellation() -> None:
    async def stubborn() -> None:
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True  # what wait_for can do on Python < 3.12

    async def main() -> None:
        tasks = [asyncio.ensure_future(stubborn()) for _ in range(3)]
        await asyncio.sleep(0.02)
        start = time.monotonic()
        await stop_tasks(tasks, timeout_s=5.0)
        assert all(t.done() for t in tasks)
        assert time.monotonic() - start < 2.0

    asyncio.run(main())


def test_a_host_too_slow_for_the_clock_is_told_once(
    task: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nodes' deadlines are real seconds in a simulation: 60 simulated seconds at
    10^6 of them a second leave a training 60 µs."""
    monkeypatch.setattr(devices, "_slow_host_told", threading.Event())
    caplog.set_level(logging.WARNING, logger="edgefl.simulator.devices")
    params, data = task.init_params(0), task.device_data(0, 40)

    def sim(name: str, time_scale: float) -> SimulatedTask:
        clock = SimClock(time.time(), time_scale)
        return SimulatedTask(task, profile(), clock, DeviceTally(name, "g", "c"), model_bytes=1)

    sim("a", 1.0).train(params, data, TrainConfig(epochs=1, deadline_s=60.0))
    assert caplog.records == []
    slow = sim("b", 1e6)
    for _ in range(2):
        slow.train(params, data, TrainConfig(epochs=1, deadline_s=60.0 / 1e6))
    (record,) = caplog.records
    assert "too slow for time_scale 1e+06" in record.getMessage()
    assert "--time-scale" in record.getMessage()
