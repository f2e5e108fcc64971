"""The built-in task: the 8x8 handwritten digits with an MLP, a deep MLP or a small CNN.

The data ships in this package (``edgefl/data/digits.npz``), so nothing is ever
downloaded. Every device of a task shares one copy of the arrays and holds only its indices.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..params import Params, Spec, from_module, spec_of
from ..wire import TrainConfig
from .base import DeviceData, TrainResult
from .partition import partition_dirichlet, partition_iid, partition_shards, split_holdout
from .training import evaluate_module, seeded_module, train_module

log = logging.getLogger(__name__)

MODELS = ("mlp", "cnn", "deep")
PARTITIONS = ("iid", "dirichlet", "shards")
#: The held-out split is fixed whatever the partition seed, so runs compare.
SPLIT_SEED = 0


class DigitsMLP(nn.Module):
    """64-128-64-10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """conv3x3 1->16, depthwise 3x3 + pointwise 16->32, GroupNorm, max-pool, linear ->10.

    GroupNorm rather than BatchNorm: running statistics and integer counters
    do not average meaningfully across devices.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.Conv2d(16, 32, 1),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


class DigitsDeepMLP(nn.Module):
    """64 -> ``width``, ``depth`` residual blocks (LayerNorm, Linear, ReLU), -> 10.

    The example of a model that marks its checkpointable blocks: where memory is
    short, the trainer recomputes their activations in backward instead of keeping them.
    """

    def __init__(self, depth: int = 8, width: int = 128) -> None:
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU())
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.blocks)


#: Bounds of the deep MLP's options: a config typo must not allocate gigabytes.
MAX_DEPTH = 64
MAX_WIDTH = 4096


#: The shipped data: 1797 images of 64 pixel counts (0..16) and their labels, uint8;
#: written by tools/digits_data.py from scikit-learn's copy.
DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "digits.npz"


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` from the shipped file: uint8 arrays of shapes (1797, 64), (1797,)."""
    with np.load(DATA_FILE) as npz:
        return npz["images"], npz["labels"]


@functools.lru_cache(maxsize=4)
def load_split(
    test_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test tensors ``(x_train, y_train, x_test, y_test)``, inputs scaled to [0, 1].

    Stratified by label with a fixed seed; cached so that every task in a
    process shares one copy.
    """
    images, labels = load_digits()
    train, test = split_holdout(labels, test_fraction, SPLIT_SEED)
    x = torch.from_numpy(images).float().div_(16.0)
    y = torch.from_numpy(labels).long()
    return x[train], y[train], x[test], y[test]


class DigitsTask:
    """Digits classification partitioned over devices IID, Dirichlet(``alpha``) or by shards.

    ``seed`` fixes the partition; the test split is fixed independently of it.
    """

    name = "digits"

    def __init__(
        self,
        model: str = "mlp",
        partition: str = "iid",
        alpha: float = 0.5,
        shards_per_device: int = 2,
        seed: int = 0,
        test_fraction: float = 0.2,
        depth: int = 8,
        width: int = 128,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"digits model must be one of {MODELS}, got {model!r}")
        if not (1 <= int(depth) <= MAX_DEPTH and 1 <= int(width) <= MAX_WIDTH):
            raise ValueError(
                f"deep MLP depth must be in 1..{MAX_DEPTH} and width in 1..{MAX_WIDTH}, "
                f"got {depth} and {width}"
            )
        if partition not in PARTITIONS:
            raise ValueError(f"digits partition must be one of {PARTITIONS}, got {partition!r}")
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.model = model
        self.partition = partition
        self.alpha = float(alpha)
        self.shards_per_device = int(shards_per_device)
        self.seed = int(seed)
        self.test_fraction = float(test_fraction)
        self.depth = int(depth)
        self.width = int(width)
        self._x, self._y, x_test, y_test = load_split(self.test_fraction)
        self._test = DeviceData(x_test, y_test)
        self._partitions: dict[int, list[torch.Tensor]] = {}
        self._spec: Spec | None = None

    def __repr__(self) -> str:
        return (
            f"DigitsTask(model={self.model!r}, partition={self.partition!r}, "
            f"alpha={self.alpha}, seed={self.seed})"
        )

    @property
    def num_train(self) -> int:
        return len(self._y)

    def build_model(self) -> nn.Module:
        if self.model == "deep":
            return DigitsDeepMLP(self.depth, self.width)
        return DigitsCNN() if self.model == "cnn" else DigitsMLP()

    def init_params(self, seed: int = 0) -> Params:
        return from_module(seeded_module(self.build_model, seed))

    def spec(self) -> Spec:
        if self._spec is None:
            self._spec = spec_of(self.init_params())
        return dict(self._spec)

    def all_data(self) -> DeviceData:
        """The whole training set, for centralized baselines."""
        return DeviceData(self._x, self._y)

    def shard_indices(self, num_shards: int) -> list[torch.Tensor]:
        """Training-row indices of every shard, computed once per ``num_shards``."""
        shards = self._partitions.get(num_shards)
        if shards is None:
            labels = self._y.numpy()
            if self.partition == "iid":
                parts = partition_iid(labels, num_shards, self.seed)
            elif self.partition == "dirichlet":
                parts = partition_dirichlet(labels, num_shards, self.alpha, self.seed)
            else:
                parts = partition_shards(labels, num_shards, self.shards_per_device, self.seed)
            shards = [torch.from_numpy(p) for p in parts]
            self._partitions[num_shards] = shards
            log.debug("digits %s partition over %d shards ready", self.partition, num_shards)
        return shards

    def device_data(self, shard: int, num_shards: int) -> DeviceData:
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
        return DeviceData(self._x, self._y, self.shard_indices(num_shards)[shard])

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
        should_stop: Callable[[], bool] | None = None,
        free_memory_mb: float | None = None,
    ) -> TrainResult:
        return train_module(
            seeded_module(self.build_model, 0),
            params,
            data,
            cfg,
            precision=precision,
            device=device,
            global_params=global_params,
            seed=seed,
            should_stop=should_stop,
            free_memory_mb=free_memory_mb,
        )

    def evaluate(self, params: Params, data: DeviceData | None = None) -> dict[str, float]:
        model = seeded_module(self.build_model, 0)
        return evaluate_module(model, params, self._test if data is None else data)
