"""The Task protocol that device agents train through, its data and result types, and load_task.

A task owns a model, per-device data and an evaluation; it never touches MQTT, disks
or the clock of a node, and never changes global torch state except through
``set_torch_threads``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..params import Params, Spec
from ..wire import TrainConfig

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "auto", "fp16", "bf16")
DEVICES = ("cpu", "cuda", "auto")

#: Built-in task names and the ``module:attribute`` they stand for.
BUILTIN_TASKS: dict[str, str] = {"digits": "edgefl.tasks.digits:DigitsTask"}


class DeviceData:
    """One device's local samples: a view into arrays shared by every device of a task.

    ``index`` selects rows of the shared ``source_x``/``source_y`` tensors, so
    thousands of devices in one process cost one index array each, not a copy of
    the data. Without ``index`` the tensors are the device's data as they are.
    """

    __slots__ = ("index", "source_x", "source_y")

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> None:
        if index is None and len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.source_x = x
        self.source_y = y
        self.index = index

    def __len__(self) -> int:
        return len(self.source_y) if self.index is None else len(self.index)

    def __repr__(self) -> str:
        return f"DeviceData(n={len(self)}, x_shape={tuple(self.source_x.shape[1:])})"

    @property
    def x(self) -> torch.Tensor:
        """The device's inputs (gathered on access; the shared tensor is not copied at rest)."""
        return self.source_x if self.index is None else self.source_x[self.index]

    @property
    def y(self) -> torch.Tensor:
        """The device's targets."""
        return self.source_y if self.index is None else self.source_y[self.index]


@dataclass
class TrainResult:
    """What one local training run produced."""

    #: trained params minus the starting params, float32
    delta: Params
    #: samples trained on (the shard size): the update's FedAvg weight
    n: int
    #: at least loss, loss_before, train_ms, peak_mem_mb, samples
    metrics: dict[str, float]


@runtime_checkable
class Task(Protocol):
    """A learning task: model parameters, per-device data, local training and evaluation."""

    name: str

    def init_params(self, seed: int = 0) -> Params:
        """Fresh model parameters, identical for the same ``seed``."""
        ...

    def spec(self) -> Spec:
        """Names and shapes of the parameters that every update must match."""
        ...

    def device_data(self, shard: int, num_shards: int) -> DeviceData:
        """Local data of device ``shard`` of ``num_shards`` (deterministic for the task)."""
        ...

    def train(
        self,
        params: Params,
        data: DeviceData,
        cfg: TrainConfig,
        *,
        precision: str = "fp32",
        device: str = "cpu",
        global_params: Params | None = None,
        seed: int = 0,
        speed: float = 1.0,
    ) -> TrainResult:
        """Train from ``params`` on ``data``; ``speed`` only scales simulated time."""
        ...

    def evaluate(self, params: Params, data: DeviceData | None = None) -> dict[str, float] | None:
        """``{"accuracy", "loss"}`` on the held-out test set or ``data``; None without one."""
        ...


def set_torch_threads(n: int) -> None:
    """Limit torch's intra-op threads (the simulator runs one per worker process)."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        # Only settable before the first parallel op; the intra-op limit is what matters.
        log.debug("torch inter-op threads already fixed; left as they are")


def load_task(ref: str, **options: Any) -> Task:
    """The task named by ``ref``: a built-in name or ``package.module:attribute``.

    The attribute may be a Task instance, a Task class, or a factory taking
    ``**options``. Raises ValueError saying what is wrong with a bad ref.
    """
    target = BUILTIN_TASKS.get(ref, ref)
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(
            f"unknown task {ref!r}: use a built-in name ({', '.join(sorted(BUILTIN_TASKS))}) "
            "or 'package.module:attribute'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task {ref!r}: cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"task {ref!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    task = _instantiate(ref, obj, options)
    missing = [m for m in _TASK_MEMBERS if not hasattr(task, m)]
    if missing:
        raise ValueError(f"task {ref!r} is not a Task: it lacks {', '.join(missing)}")
    return task


_TASK_MEMBERS = ("name", "init_params", "spec", "device_data", "train", "evaluate")


def _instantiate(ref: str, obj: Any, options: dict[str, Any]) -> Any:
    if isinstance(obj, type):
        return obj(**options)
    if all(hasattr(obj, m) for m in _TASK_MEMBERS):
        if options:
            raise ValueError(
                f"task {ref!r} names a ready-made instance; it takes no options "
                f"(got {', '.join(sorted(options))})"
            )
        return obj
    if callable(obj):
        return obj(**options)
    raise ValueError(f"task {ref!r} names a {type(obj).__name__}, not a Task, class or factory")
