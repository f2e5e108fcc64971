"""Learning tasks: the Task protocol, local training on torch, partitioning, built-in digits.

Devices train through a Task and nothing else; nothing in this package does I/O
beyond reading the dataset a task ships with.
"""

from __future__ import annotations

from .base import (
    BUILTIN_TASKS,
    DeviceData,
    Task,
    TrainResult,
    load_task,
    set_torch_threads,
)
from .partition import partition_dirichlet, partition_iid, partition_shards

__all__ = [
    "BUILTIN_TASKS",
    "DeviceData",
    "Task",
    "TrainResult",
    "load_task",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "set_torch_threads",
]
