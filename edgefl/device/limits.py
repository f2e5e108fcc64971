"""What a model may ask of a device: bounds on its training config, and a time budget.

The parent (or whoever forged its model) sets epochs and batch size; the board's
owner sets the bounds, and the device trains within them. Pure: no I/O, no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import EdgeflError
from ..wire import TrainConfig


class OverBudget(EdgeflError, RuntimeError):
    """Local training ran past ``max_train_s`` and was stopped; the round is skipped."""


def bound_config(cfg: TrainConfig, *, max_epochs: int, min_batch_size: int) -> TrainConfig:
    """``cfg`` with at most ``max_epochs`` epochs and batches of at least ``min_batch_size``.

    Returns ``cfg`` itself when it is within the bounds already.
    """
    epochs = min(cfg.epochs, max_epochs)
    batch_size = max(cfg.batch_size, min_batch_size)
    if (epochs, batch_size) == (cfg.epochs, cfg.batch_size):
        return cfg
    return cfg.model_copy(update={"epochs": epochs, "batch_size": batch_size})


def with_budget(
    stop: Callable[[], bool],
    seconds: float,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[], bool]:
    """A ``should_stop`` that is true when ``stop`` is, or ``seconds`` after this call."""
    until = clock() + seconds
    return lambda: stop() or clock() >= until
