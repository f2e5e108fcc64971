"""Local optimizers (SGD with momentum, Adam) on torch's own functional update rules.

torch.optim's Optimizer classes import torch._dynamo, and with it sympy, the first
time one is built: about 70 MiB of resident memory a 512 MB board cannot spare.
The arithmetic here is torch's (``torch.optim.sgd.sgd``, ``torch.optim.adam.adam``);
only the per-parameter state lives here. It must never import torch._dynamo.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from ..wire import TrainConfig

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class LocalOptimizer:
    """``cfg.optimizer`` (``sgd`` or ``adam``) over ``params``, as torch.optim would step it.

    ``param_groups`` is there for ``torch.amp.GradScaler``, which unscales
    gradients through it before ``step``.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> None:
        self.params: list[torch.Tensor] = [p for p in params if p.requires_grad]
        self.param_groups: list[dict[str, Any]] = [{"params": self.params}]
        self.cfg = cfg
        self._momentum: dict[int, torch.Tensor | None] = {}
        self._moments: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        if self.cfg.optimizer == "adam":
            self._adam(live, params, grads)
        else:
            self._sgd(live, params, grads)

    def _sgd(self, live: list[int], params: list[torch.Tensor], grads: list[Any]) -> None:
        cfg = self.cfg
        buffers = [self._momentum.get(i) for i in live]
        sgd(
            params,
            grads,
            buffers,
            foreach=False,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            lr=cfg.lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
        )
        if cfg.momentum:
            for i, buf in zip(live, buffers, strict=True):
                self._momentum[i] = buf

    def _adam(self, live: list[int], params: list[torch.Tensor], grads: list[Any]) -> None:
        cfg = self.cfg
        for i, p in zip(live, params, strict=True):
            if i not in self._moments:
                zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
                self._moments[i] = (zeros, zeros.clone(), torch.tensor(0.0))
        state = [self._moments[i] for i in live]
        adam(
            params,
            grads,
            [s[0] for s in state],
            [s[1] for s in state],
            [],
            [s[2] for s in state],
            foreach=False,
            amsgrad=False,
            beta1=ADAM_BETAS[0],
            beta2=ADAM_BETAS[1],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            eps=ADAM_EPS,
            maximize=False,
        )
