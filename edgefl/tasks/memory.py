"""How much of a board's memory a training step may hold: the batch plan, and out-of-memory.

``plan_batches`` is pure: free memory and a sample's cost in, micro-batch and
checkpointing out. The probes beside it read free memory (psutil, or the
caller's override) and the bytes autograd saves per sample; none allocates to find out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import psutil
import torch
from torch import nn

from ..errors import EdgeflError

log = logging.getLogger(__name__)

#: The share of the free memory one training step may use: the rest is the
#: board's (other processes, the page cache, this process's own growth).
MEMORY_SHARE = 0.5
#: A sample costs the activations autograd saves for backward, and about as much
#: again for their gradients while backward runs.
GRAD_FACTOR = 2.0
#: Samples of the forward pass that measures a sample's cost.
PROBE_SAMPLES = 8

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class OutOfMemory(EdgeflError, RuntimeError):
    """Training ran out of memory even one sample at a time; the round is skipped."""


@dataclass(frozen=True)
class BatchPlan:
    """What one round trains with, and the figures it was chosen from."""

    #: samples per optimizer step (the model's batch_size times its accum)
    step: int
    #: samples per forward and backward pass
    micro: int
    #: whether the task's checkpointable blocks recompute their activations
    checkpointing: bool
    #: the free memory planned against, and what one sample costs in it
    free_bytes: int
    sample_bytes: int
    #: micro-batches halved after an out-of-memory
    retries: int = 0

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step."""
        return math.ceil(self.step / self.micro)

    def halved(self) -> BatchPlan:
        return replace(self, micro=max(1, self.micro // 2), retries=self.retries + 1)

    def metrics(self) -> dict[str, float]:
        return {
            "batch": float(self.step),
            "micro_batch": float(self.micro),
            "accum": float(self.accum),
            "checkpointing": float(self.checkpointing),
            "memory_free_mb": self.free_bytes / 2**20,
            "sample_kb": self.sample_bytes / 1024,
            "oom_retries": float(self.retries),
        }


def plan_batches(
    step: int,
    micro: int,
    *,
    free_bytes: int,
    sample_bytes: int,
    fixed_bytes: int = 0,
    checkpointed_sample_bytes: int | None = None,
) -> BatchPlan:
    """The largest micro-batch up to ``micro`` whose samples fit the step's memory budget.

    The budget is ``MEMORY_SHARE`` of ``free_bytes`` less ``fixed_bytes`` (gradients
    and optimizer state). Where ``micro`` does not fit and checkpointing makes a
    sample cheaper (``checkpointed_sample_bytes``), checkpointing turns on.
    """
    budget = max(0.0, free_bytes * MEMORY_SHARE - fixed_bytes)
    plan = BatchPlan(step, micro, False, free_bytes, sample_bytes)
    if sample_bytes * micro <= budget:
        return plan
    cost = sample_bytes
    if checkpointed_sample_bytes is not None and checkpointed_sample_bytes < sample_bytes:
        cost = checkpointed_sample_bytes
        plan = replace(plan, checkpointing=True, sample_bytes=cost)
    fits = max(1, min(micro, int(budget // max(cost, 1))))
    # As few micro-batches as fit, of even size: 256 in two of 128, not 209 and 47.
    return replace(plan, micro=math.ceil(micro / math.ceil(micro / fits)))


def free_memory(device: str, override_mb: float | None = None) -> int:
    """Bytes free for training: ``override_mb`` when given, else what the board has."""
    if override_mb is not None:
        return int(override_mb * 2**20)
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return int(psutil.virtual_memory().available)


def sample_bytes(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, loss_fn: LossFn) -> int:
    """Bytes one sample costs a training step: what autograd saves for it, times GRAD_FACTOR.

    One forward pass on ``xs`` in eval mode (no dropout draw, no running-statistics
    update); the parameters that autograd also saves are not counted.
    """
    own = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in own:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(model(xs), ys)
    finally:
        model.train(was_training)
    return math.ceil(GRAD_FACTOR * sum(seen.values()) / max(len(xs), 1))


def fixed_bytes(model: nn.Module, optimizer: str) -> int:
    """Gradients and optimizer state: a copy of the parameters each (Adam keeps two)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return size * (3 if optimizer == "adam" else 2)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA's, the CPU allocator's, Python's)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text
    )


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a model marks as checkpointable (``model.checkpoint_blocks()``), or none."""
    marked = getattr(model, "checkpoint_blocks", None)
    return list(marked()) if callable(marked) else []


def enable_checkpointing(model: nn.Module) -> int:
    """Make every marked block recompute its activations in backward; returns how many.

    ``Recompute``, not torch's checkpoint: its non-reentrant form (and the
    ``checkpoint`` wrapper) imports torch._dynamo, about 70 MiB, and its reentrant
    form sympy, about 30 MiB, at the first backward: on a board short of memory,
    the moment it can least afford them. A block whose input needs no gradient runs
    as it is, since recomputing would give its parameters none.
    """
    blocks = checkpoint_blocks(model)
    for block in blocks:
        forward = block.forward

        def checkpointed(x: torch.Tensor, forward: Callable[..., torch.Tensor] = forward) -> object:
            if torch.is_grad_enabled() and x.requires_grad:
                return Recompute.apply(forward, x)
            return forward(x)

        block.forward = checkpointed
    return len(blocks)


class Recompute(torch.autograd.Function):
    """``forward(x)`` keeping only ``x``; run again in backward, under the same autocast
    and random state (a dropout draws the same mask)."""

    @staticmethod
    def forward(
        ctx: Any, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        ctx.block = forward
        ctx.autocast = _autocast_now(x.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        with torch.no_grad():
            return forward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor | None]:
        (saved,) = ctx.saved_tensors
        x = saved.detach().requires_grad_(True)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with torch.enable_grad():
                with ctx.autocast:
                    out = ctx.block(x)
                # The backward of a scalar: the same vector-Jacobian product as
                # ``backward(out, grad)``, whose explicit-gradient check imports sympy.
                (out * grad).sum().backward()
        return None, x.grad


def _autocast_now(device_type: str) -> torch.autocast:
    """The autocast in force for ``device_type``, to enter again in backward."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: one function per device type
        cpu = device_type == "cpu"
        enabled = getattr(torch, "is_autocast_cpu_enabled" if cpu else "is_autocast_enabled")()
        dtype = getattr(torch, "get_autocast_cpu_dtype" if cpu else "get_autocast_gpu_dtype")()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def disable_checkpointing(model: nn.Module) -> None:
    """Undo ``enable_checkpointing``: the blocks' own forward again."""
    for block in checkpoint_blocks(model):
        block.__dict__.pop("forward", None)
