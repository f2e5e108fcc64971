"""Local training and evaluation of a torch module on one device's data, for any Task.

Pure computation: params in, delta and metrics out. It never touches MQTT or
disk, and never changes global torch state (RNG included) behind the caller.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..params import Params, from_module, load_into, subtract
from ..wire import TrainConfig
from .base import DEVICES, PRECISIONS, DeviceData, TrainResult
from .memory import (
    PROBE_SAMPLES,
    BatchPlan,
    OutOfMemory,
    disable_checkpointing,
    enable_checkpointing,
    fixed_bytes,
    free_memory,
    is_out_of_memory,
    plan_batches,
    sample_bytes,
)
from .optim import LocalOptimizer

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_warned: set[str] = set()


class TrainingStopped(Exception):
    """``should_stop`` asked local training to end early; there is no result."""


def accepts(train: Callable[..., Any], option: str) -> bool:
    """Whether a Task's ``train`` takes the keyword ``option`` (older tasks may not)."""
    try:
        params = inspect.signature(train).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == option or p.kind is p.VAR_KEYWORD for p in params)


def accepts_should_stop(train: Callable[..., Any]) -> bool:
    """Whether a Task's ``train`` takes ``should_stop`` (tasks written before it may not)."""
    return accepts(train, "should_stop")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda``: ``auto`` picks CUDA when torch sees one; absent CUDA falls back."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device == "cuda" and not has_cuda:
        _warn_once("no-cuda", "device 'cuda' requested but torch sees no CUDA GPU; using cpu")
        return "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    """The precision that will actually run on ``device`` (a resolved device).

    ``fp16`` needs CUDA (autocast plus a grad scaler) and falls back to fp32
    elsewhere; ``auto`` is fp16 on CUDA and fp32 on CPU; ``bf16`` is autocast
    to bfloat16 on either, on request only.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if precision == "fp16" and device != "cuda":
        _warn_once("fp16-cpu", "fp16 mixed precision needs a CUDA device; training in fp32")
        return "fp32"
    return precision


def seeded_module(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build ``factory()`` with torch's CPU RNG seeded by ``seed``, then restore the RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def peak_memory_mb(device: str) -> float:
    """CUDA peak allocation on ``cuda``, else the process's peak resident set size."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


#: samples used to estimate the loss before training (``loss_before``)
LOSS_PROBE = 256


def train_module(
    model: nn.Module,
    params: Params,
    data: DeviceData,
    cfg: TrainConfig,
    *,
    precision: str = "fp32",
    device: str = "cpu",
    global_params: Params | None = None,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
    should_stop: Callable[[], bool] | None = None,
    free_memory_mb: float | None = None,
) -> TrainResult:
    """Load ``params`` into ``model``, train it on ``data`` as ``cfg`` says, return the delta.

    FedProx (``cfg.mu > 0``) pulls towards ``global_params``, or towards the
    starting ``params`` when none are given. A step takes ``cfg.batch_size *
    cfg.accum`` samples in micro-batches weighed by their samples, as large as
    the free memory allows (``free_memory_mb``, else measured): the steps are the
    same whatever the micro-batch. An out-of-memory halves the micro-batch and
    trains the round again from ``params``; one at a time still failing raises
    ``OutOfMemory``. The same seed, inputs and plan give the same delta.
    ``should_stop`` is asked before every step; True raises ``TrainingStopped``
    (a device agent shutting down mid-round).
    """
    n = len(data)
    if n == 0:
        raise ValueError("cannot train on an empty shard")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    load_into(model, params)
    model.to(dev)
    xs, ys = data.x.to(dev), data.y.to(dev)
    # An estimate on a bounded sample: over a whole shard this forward pass would
    # cost a tenth of a 5-epoch round for a number that is only reported.
    probe = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:LOSS_PROBE]
    probe = probe.to(dev)
    loss_before = _mean_loss(model, xs[probe], ys[probe], loss_fn, LOSS_PROBE)
    try:
        plan = _plan(model, xs, ys, cfg, loss_fn, free_memory(dev, free_memory_mb))
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemory(f"out of memory measuring {PROBE_SAMPLES} samples: {exc}") from exc

    anchor = _prox_anchor(model, global_params if global_params is not None else params, cfg)
    start = time.perf_counter()
    while True:
        try:
            epoch_loss, steps = _epochs(
                model, xs, ys, cfg, plan, prec, anchor, loss_fn, seed, should_stop
            )
            break
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            if plan.micro == 1:
                raise OutOfMemory(f"out of memory one sample at a time: {exc}") from exc
            plan = plan.halved()
            log.warning("out of memory in training; again with micro-batches of %d", plan.micro)
            if dev == "cuda":
                torch.cuda.empty_cache()
            load_into(model, params)
    if dev == "cuda":
        torch.cuda.synchronize()
    train_ms = (time.perf_counter() - start) * 1000.0
    delta = subtract(from_module(model), params)
    metrics = {
        "loss": epoch_loss / n,
        "loss_before": loss_before,
        "train_ms": train_ms,
        "peak_mem_mb": peak_memory_mb(dev),
        "samples": float(n),
        "epochs": float(cfg.epochs),
        "steps": float(steps),
        "mixed_precision": 0.0 if prec == "fp32" else 1.0,
        **plan.metrics(),
    }
    if not math.isfinite(metrics["loss"]):
        log.warning("local training diverged: loss=%s after %d steps", metrics["loss"], steps)
    return TrainResult(delta=delta, n=n, metrics=metrics)


def _plan(
    model: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    cfg: TrainConfig,
    loss_fn: LossFn,
    free: int,
) -> BatchPlan:
    """The round's micro-batch from ``free`` bytes; checkpointing where it is short of them."""
    probe = slice(0, PROBE_SAMPLES)
    plan = plan_batches(
        cfg.batch_size * cfg.accum,
        cfg.batch_size,
        free_bytes=free,
        sample_bytes=sample_bytes(model, xs[probe], ys[probe], loss_fn),
        fixed_bytes=fixed_bytes(model, cfg.optimizer),
    )
    if plan.micro < cfg.batch_size and enable_checkpointing(model):
        plan = plan_batches(
            plan.step,
            cfg.batch_size,
            free_bytes=free,
            sample_bytes=plan.sample_bytes,
            fixed_bytes=fixed_bytes(model, cfg.optimizer),
            checkpointed_sample_bytes=sample_bytes(model, xs[probe], ys[probe], loss_fn),
        )
        if not plan.checkpointing:
            disable_checkpointing(model)
    return plan


def _epochs(
    model: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    cfg: TrainConfig,
    plan: BatchPlan,
    prec: str,
    anchor: dict[str, torch.Tensor],
    loss_fn: LossFn,
    seed: int,
    should_stop: Callable[[], bool] | None,
) -> tuple[float, int]:
    """``cfg.epochs`` over the data as ``plan`` says: (the last epoch's summed loss, steps)."""
    dev = xs.device
    n = len(ys)
    optimizer = LocalOptimizer(model.parameters(), cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=prec == "fp16")
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    epoch_loss = torch.zeros((), device=dev)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator).to(dev)
        epoch_loss = torch.zeros((), device=dev)
        for group in _step_groups(order, plan.step, plan.micro):
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"stopped after {steps} steps")
            group_n = sum(len(b) for b in group)
            optimizer.zero_grad(set_to_none=True)
            for batch in group:
                with _autocast(dev.type, prec):
                    loss = loss_fn(model(xs[batch]), ys[batch])
                epoch_loss += loss.detach().float() * len(batch)
                weighted = loss.float() * (len(batch) / group_n)
                if anchor:
                    weighted = weighted + _prox_term(model, anchor, cfg.mu) * (len(batch) / group_n)
                scaler.scale(weighted).backward()
            if cfg.clip is not None:
                scaler.unscale_(optimizer)  # type: ignore[arg-type]
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            scaler.step(optimizer)  # type: ignore[arg-type]
            scaler.update()
            steps += 1
    return float(epoch_loss), steps


def evaluate_module(
    model: nn.Module,
    params: Params,
    data: DeviceData,
    *,
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Accuracy (argmax against class labels) and mean loss of ``params`` on ``data``, on CPU."""
    load_into(model, params)
    model.to("cpu")
    xs, ys = data.x, data.y
    correct = 0
    total_loss = 0.0
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(ys), batch_size):
            out = model(xs[begin : begin + batch_size])
            target = ys[begin : begin + batch_size]
            total_loss += float(loss_fn(out, target)) * len(target)
            correct += int((out.argmax(dim=1) == target).sum())
    n = max(len(ys), 1)
    return {"accuracy": correct / n, "loss": total_loss / n}


def _mean_loss(
    model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, loss_fn: LossFn, batch_size: int
) -> float:
    total = torch.zeros((), device=xs.device)
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(ys), batch_size):
            target = ys[begin : begin + batch_size]
            total += loss_fn(model(xs[begin : begin + batch_size]), target).float() * len(target)
    return float(total) / len(ys)


def _step_groups(order: torch.Tensor, step: int, micro: int) -> Iterator[list[torch.Tensor]]:
    """``order`` in steps of ``step`` samples, each in micro-batches of ``micro``."""
    for chunk in torch.split(order, step):
        yield list(torch.split(chunk, micro))


def _prox_anchor(model: nn.Module, anchor: Params, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The FedProx centre as tensors beside the trainable parameters; empty when mu is 0."""
    if cfg.mu <= 0:
        return {}
    device = next(model.parameters()).device
    return {
        name: torch.as_tensor(anchor[name], device=device)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _prox_term(model: nn.Module, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    squares = [
        ((p.float() - anchor[name]) ** 2).sum()
        for name, p in model.named_parameters()
        if name in anchor
    ]
    return 0.5 * mu * torch.stack(squares).sum()


def _autocast(device: str, precision: str) -> Any:
    if precision == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()
