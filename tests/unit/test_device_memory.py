"""A device within its memory: batch plans, out-of-memory retries, checkpointing, lean imports."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from timeouts import within
from torch import nn
from torch.nn import functional as F

from edgefl.config import DeviceSettings
from edgefl.device import DeviceAgent
from edgefl.tasks import load_task, set_torch_threads
from edgefl.tasks.digits import DigitsTask
from edgefl.tasks.memory import OutOfMemory, enable_checkpointing, plan_batches
from edgefl.tasks.training import train_module
from edgefl.topics import Topics
from edgefl.transport import MemoryBroker, MemoryTransport
from edgefl.wire import TrainConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from aggregator_fakes import publish_round

TOPICS = Topics()
CFG = TrainConfig(epochs=2, batch_size=64, lr=0.05, momentum=0.9)


@pytest.fixture(scope="module")
def task() -> DigitsTask:
    set_torch_threads(1)
    return DigitsTask()


def test_short_memory_keeps_the_step_in_fewer_even_micro_batches() -> None:
    plenty = plan_batches(256, 256, free_bytes=2**30, sample_bytes=4096)
    assert (plenty.micro, plenty.accum, plenty.checkpointing) == (256, 1, False)
    # budget: half of 1 MiB less 128 KiB = 384 KiB, 96 samples of 4 KiB: 256 in 3 of 86
    short = plan_batches(256, 256, free_bytes=2**20, sample_bytes=4096, fixed_bytes=2**17)
    assert (short.step, short.micro, short.accum) == (256, 86, 3)
    cheaper = plan_batches(
        256, 256, free_bytes=2**20, sample_bytes=4096, checkpointed_sample_bytes=1024
    )
    assert (cheaper.micro, cheaper.checkpointing, cheaper.sample_bytes) == (256, True, 1024)
    none_left = plan_batches(64, 64, free_bytes=2**10, sample_bytes=4096, fixed_bytes=2**20)
    assert none_left.micro == 1 and none_left.accum == 64


def test_small_free_memory_trains_smaller_micro_batches_to_the_same_result(
    task: DigitsTask,
) -> None:
    params, data = task.init_params(0), task.device_data(0, 4)
    roomy = task.train(params, data, CFG, seed=3)
    small = task.train(params, data, CFG, seed=3, free_memory_mb=0.5)
    assert roomy.metrics["micro_batch"] == 64 and roomy.metrics["accum"] == 1
    assert small.metrics["batch"] == 64 and small.metrics["micro_batch"] < 64
    assert small.metrics["accum"] == 64 / small.metrics["micro_batch"]
    assert small.metrics["memory_free_mb"] == 0.5 and small.metrics["sample_kb"] > 1
    assert small.metrics["steps"] == roomy.metrics["steps"]
    assert small.metrics["loss"] == pytest.approx(roomy.metrics["loss"], rel=1e-4)
    for name, d in roomy.delta.items():
        torch.testing.assert_close(torch.from_numpy(small.delta[name]), torch.from_numpy(d))


def _oom_above(limit: int, calls: list[int]) -> Any:
    """A cross entropy that fails like the allocator on training batches over ``limit``."""

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and len(target) > limit:
            calls.append(len(target))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return F.cross_entropy(out, target)

    return loss


def test_an_out_of_memory_halves_the_micro_batch_and_trains_the_round_again(
    task: DigitsTask,
) -> None:
    params, data = task.init_params(0), task.device_data(0, 4)
    calls: list[int] = []
    model = task.build_model()
    result = train_module(model, params, data, CFG, seed=3, loss_fn=_oom_above(16, calls))
    assert calls == [64, 32]
    assert result.metrics["oom_retries"] == 2 and result.metrics["micro_batch"] == 16
    assert result.metrics["accum"] == 4 and result.metrics["batch"] == 64
    direct = task.train(params, data, CFG, seed=3)
    assert result.metrics["loss"] == pytest.approx(direct.metrics["loss"], rel=1e-4)


def test_out_of_memory_one_sample_at_a_time_is_out_of_memory(task: DigitsTask) -> None:
    params, data = task.init_params(0), task.device_data(0, 4)
    with pytest.raises(OutOfMemory):
        train_module(task.build_model(), params, data, CFG, loss_fn=_oom_above(0, []))


def test_a_programming_error_in_training_is_raised_not_retried(task: DigitsTask) -> None:
    calls: list[int] = []

    def broken(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(len(target))
        if torch.is_grad_enabled():
            return F.cross_entropy(out[:, :3], target.float())  # a bug: wrong target dtype
        return F.cross_entropy(out, target)

    params, data = task.init_params(0), task.device_data(0, 4)
    with pytest.raises(RuntimeError) as raised:
        train_module(task.build_model(), params, data, CFG, loss_fn=broken)
    assert not isinstance(raised.value, OutOfMemory)
    assert len(calls) == 2  # the loss before training, then the per-sample probe: no retry


def test_a_deep_model_short_of_memory_checkpoints_its_blocks_to_the_same_delta() -> None:
    deep = DigitsTask(model="deep", depth=3, width=32)
    params, data = deep.init_params(0), deep.device_data(0, 8)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.02, momentum=0.9)
    plain = deep.train(params, data, cfg, seed=1)
    short = deep.train(params, data, cfg, seed=1, free_memory_mb=0.2)
    assert plain.metrics["checkpointing"] == 0 and short.metrics["checkpointing"] == 1
    assert short.metrics["micro_batch"] == 32  # checkpointing alone made it fit
    assert short.metrics["sample_kb"] < plain.metrics["sample_kb"]
    for name, d in plain.delta.items():
        torch.testing.assert_close(
            torch.from_numpy(short.delta[name]), torch.from_numpy(d), atol=1e-5, rtol=1e-4
        )


# ------------------------------------------------------------------ the agent


async def _publish(gw: MemoryTransport, task: Any) -> None:
    config = TrainConfig(epochs=1, batch_size=64)
    await publish_round(gw, TOPICS, "gw", task.init_params(0), round=1, config=config)


class _Broken:
    """The digits task with a defect in its training (the kind a task author makes)."""

    def __init__(self) -> None:
        self.inner = load_task("digits")
        self.name = "broken"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (32x64 and 65x128)")


async def _run(agent: DeviceAgent, broker: MemoryBroker, task: Any, until: Any) -> None:
    async with MemoryTransport(broker, "gw-node") as gw, agent:
        runner = asyncio.create_task(agent.run())
        try:
            await _publish(gw, task)
            async with within(20):
                while not until():
                    await asyncio.sleep(0.01)
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def test_a_device_with_little_free_memory_trains_a_smaller_micro_batch(
    tmp_path: Path, task: DigitsTask
) -> None:
    broker = MemoryBroker()
    settings = DeviceSettings(
        id="dev-1", gateway="gw", state_dir=tmp_path, num_shards=8, free_memory_mb=0.5
    )
    agent = DeviceAgent(settings, task, transport=broker.factory())
    await _run(agent, broker, task, lambda: agent.last_metrics.get("event") == "round")
    assert sum(agent.declined.values()) == 0
    metrics = agent.last_metrics
    assert metrics["batch"] == 64 and metrics["micro_batch"] < 64
    assert metrics["accum"] * metrics["micro_batch"] >= 64
    assert metrics["memory_free_mb"] == 0.5 and metrics["oom_retries"] == 0


async def test_a_defect_in_a_task_stops_the_device_instead_of_skipping_rounds(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    broken = _Broken()
    settings = DeviceSettings(id="dev-1", gateway="gw", state_dir=tmp_path, num_shards=8)
    agent = DeviceAgent(settings, broken, transport=broker.factory())  # type: ignore[arg-type]
    async with MemoryTransport(broker, "gw-node") as gw, agent:
        runner = asyncio.create_task(agent.run())
        await _publish(gw, broken)
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            async with within(20):
                await runner
    assert agent.declined["train_failed"] == 0 and agent.rounds_trained == 0


# ------------------------------------------------------------------ footprint

LEAN = textwrap.dedent("""
    import sys
    import edgefl.device
    from edgefl.tasks import load_task
    from edgefl.wire import TrainConfig
    task = load_task("digits")
    task.train(task.init_params(0), task.device_data(0, 16), TrainConfig(epochs=1))
    heavy = ("sklearn", "scipy", "matplotlib", "rich", "sympy", "torch._dynamo", "edgefl.simulator")
    print(" ".join(sorted(m for m in heavy if m in sys.modules)))
""")


#: A round short of memory, where the deep MLP checkpoints its blocks: the moment a
#: small board can least afford an import.
CHECKPOINTED = LEAN.replace(
    'task = load_task("digits")',
    'task = load_task("digits", model="deep", depth=3, width=32)',
).replace("TrainConfig(epochs=1))", "TrainConfig(epochs=1), free_memory_mb=0.2)")


@pytest.mark.parametrize("script", [LEAN, CHECKPOINTED], ids=["plain", "checkpointed"])
def test_the_device_path_imports_no_heavy_libraries(script: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_recomputed_block_gives_the_gradients_of_the_plain_one(autocast: bool) -> None:
    """The same random draws (a dropout's mask) and the same autocast in the recompute."""

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.ReLU()) for _ in range(3)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = x + block(x)
            return x.float().sum()

        def checkpoint_blocks(self) -> list[nn.Module]:
            return list(self.blocks)

    def grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    torch.manual_seed(0)
    plain, x = Deep(), torch.randn(8, 16, requires_grad=True)
    recomputed = Deep()
    recomputed.load_state_dict(plain.state_dict())
    assert enable_checkpointing(recomputed) == 3
    expected, got = grads(plain, x), grads(recomputed, x)
    assert len(got) == len(expected) == 6
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
