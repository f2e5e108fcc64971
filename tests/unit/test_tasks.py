"""The Task protocol, the partitions and local training on the built-in digits task."""

from __future__ import annotations

import logging
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from edgefl.params import add, l2_norm, spec_of
from edgefl.tasks import (
    DeviceData,
    Task,
    load_task,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from edgefl.tasks.digits import DigitsTask, load_digits
from edgefl.tasks.partition import split_holdout
from edgefl.wire import TrainConfig

FAST = TrainConfig(epochs=5, batch_size=16, lr=0.1, momentum=0.9)


@pytest.fixture(scope="module")
def task() -> DigitsTask:
    return DigitsTask()


@pytest.fixture(scope="module")
def labels(task: DigitsTask) -> np.ndarray:
    return task.all_data().y.numpy()


def _label_entropy(labels: np.ndarray, shard: np.ndarray) -> float:
    counts = np.bincount(labels[shard], minlength=10)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------ the data


def test_shipped_digits_are_scikit_learns_digits_exactly() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    reference = datasets.load_digits()
    images, labels = load_digits()
    assert images.dtype == labels.dtype == np.uint8
    assert images.shape == (1797, 64)
    np.testing.assert_array_equal(images, reference.data)
    np.testing.assert_array_equal(labels, reference.target)


def test_holdout_split_is_stratified_disjoint_and_sized_like_a_ceiling() -> None:
    _, labels = load_digits()
    train, test = split_holdout(labels, 0.2, 0)
    assert len(test) == math.ceil(0.2 * len(labels)) == 360
    assert len(train) + len(test) == len(labels)
    assert np.intersect1d(train, test).size == 0
    share = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.02)
    again = split_holdout(labels, 0.2, 0)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(split_holdout(labels, 0.2, 1)[1], test)


# ------------------------------------------------------------------ partitions

SCHEMES = {
    "iid": lambda labels, k, seed: partition_iid(labels, k, seed),
    "dirichlet": lambda labels, k, seed: partition_dirichlet(labels, k, 0.5, seed),
    "dirichlet_tiny_alpha": lambda labels, k, seed: partition_dirichlet(labels, k, 0.05, seed),
    "shards": lambda labels, k, seed: partition_shards(labels, k, 2, seed),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("num_shards", [1, 7, 40, 300])
def test_partition_covers_every_sample_once_and_is_deterministic(
    labels: np.ndarray, scheme: str, num_shards: int
) -> None:
    split = SCHEMES[scheme]
    shards = split(labels, num_shards, 3)
    assert len(shards) == num_shards
    joined = np.concatenate(shards)
    assert len(joined) == len(labels)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert min(len(s) for s in shards) >= (2 if scheme.startswith("dirichlet") else 1)
    again = split(labels, num_shards, 3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    if num_shards > 1:
        other = split(labels, num_shards, 4)
        assert any(not np.array_equal(a, b) for a, b in zip(shards, other, strict=True))


def test_dirichlet_with_small_alpha_is_skewed(labels: np.ndarray) -> None:
    iid = partition_iid(labels, 40, 0)
    skewed = partition_dirichlet(labels, 40, 0.1, 0)
    iid_entropy = np.mean([_label_entropy(labels, s) for s in iid])
    skewed_entropy = np.mean([_label_entropy(labels, s) for s in skewed])
    assert iid_entropy > 2.0  # close to log(10) = 2.30
    assert skewed_entropy < iid_entropy - 1.0


def test_label_shards_give_each_device_few_classes(labels: np.ndarray) -> None:
    shards = partition_shards(labels, 40, 2, 0)
    classes = [len(np.unique(labels[s])) for s in shards]
    # two label-sorted pieces; a piece may straddle one label boundary
    assert max(classes) <= 4
    assert np.mean(classes) <= 3.0


def test_dirichlet_tops_up_shards_when_redraws_cannot(labels: np.ndarray) -> None:
    shards = partition_dirichlet(labels, 700, 0.05, 0, min_size=2)
    assert min(len(s) for s in shards) == 2
    assert sum(len(s) for s in shards) == len(labels)


def test_partition_refuses_more_shards_than_samples(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="cannot fill"):
        partition_iid(labels, len(labels) + 1, 0)
    with pytest.raises(ValueError, match="cannot fill"):
        partition_dirichlet(labels, len(labels), 0.5, 0, min_size=2)
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(labels, 4, 0.0, 0)


# ------------------------------------------------------------------ task shape


def test_digits_task_satisfies_the_protocol(task: DigitsTask) -> None:
    assert isinstance(task, Task)
    assert task.name == "digits"


def test_init_params_are_float32_deterministic_and_match_spec(task: DigitsTask) -> None:
    a, b, c = task.init_params(0), task.init_params(0), task.init_params(1)
    assert all(arr.dtype == np.float32 for arr in a.values())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    assert spec_of(a) == task.spec()
    assert sum(arr.size for arr in a.values()) == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10


def test_cnn_has_only_averageable_float_state() -> None:
    cnn = DigitsTask(model="cnn")
    params = cnn.init_params()
    module = cnn.build_model()
    assert set(params) == set(module.state_dict())  # no integer BatchNorm counters left out
    assert not any("running" in name for name in params)
    assert params["features.2.weight"].shape == (16, 1, 3, 3)  # depthwise


def test_device_data_indexes_the_shared_arrays(task: DigitsTask) -> None:
    devices = [task.device_data(i, 40) for i in range(40)]
    assert sum(len(d) for d in devices) == task.num_train
    assert devices[0].source_x.data_ptr() == devices[39].source_x.data_ptr()
    assert devices[0].x.shape == (len(devices[0]), 64)
    assert float(devices[0].x.max()) <= 1.0 and float(devices[0].x.min()) >= 0.0
    assert task.shard_indices(40) is task.shard_indices(40)  # cached, not recomputed
    with pytest.raises(ValueError, match="outside"):
        task.device_data(40, 40)


def test_test_split_is_fixed_whatever_the_partition_seed() -> None:
    a = DigitsTask(partition="dirichlet", seed=1)
    b = DigitsTask(partition="iid", seed=2)
    pa, pb = a.init_params(), b.init_params()
    assert a.evaluate(pa) == b.evaluate(pb)
    assert a.evaluate(pa)["accuracy"] < 0.3  # untrained: near chance


# -------------------------------------------------------------------- training


def test_training_on_a_quarter_of_the_data_lowers_the_shard_loss(task: DigitsTask) -> None:
    params = task.init_params(0)
    shard = task.device_data(0, 4)
    result = task.train(params, shard, FAST)
    assert result.n == len(shard) == 360
    assert {"loss", "loss_before", "train_ms", "peak_mem_mb", "samples"} <= set(result.metrics)
    assert result.metrics["samples"] == 360
    assert result.metrics["loss_before"] > 2.0
    assert result.metrics["loss"] < 0.5 * result.metrics["loss_before"]
    after = task.evaluate(add(params, result.delta), shard)
    assert after["loss"] < 0.5 * result.metrics["loss_before"]
    assert result.metrics["peak_mem_mb"] > 10
    assert all(d.dtype == np.float32 for d in result.delta.values())


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_central_training_reaches_80_percent_test_accuracy(model: str) -> None:
    task = DigitsTask(model=model)
    params = task.init_params(0)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, momentum=0.9)
    result = task.train(params, task.all_data(), cfg)
    scores = task.evaluate(add(params, result.delta))
    assert scores["accuracy"] > 0.8


def test_same_seed_gives_the_same_delta(task: DigitsTask) -> None:
    params, shard = task.init_params(0), task.device_data(1, 10)
    a = task.train(params, shard, FAST, seed=7).delta
    b = task.train(params, shard, FAST, seed=7).delta
    c = task.train(params, shard, FAST, seed=8).delta
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_training_leaves_the_global_rng_alone(task: DigitsTask) -> None:
    before = torch.get_rng_state()
    task.train(task.init_params(0), task.device_data(0, 10), FAST, seed=3)
    task.init_params(5)
    assert torch.equal(before, torch.get_rng_state())


def test_fedprox_pulls_the_delta_towards_the_global_model(task: DigitsTask) -> None:
    params, shard = task.init_params(0), task.device_data(0, 4)
    plain = l2_norm(task.train(params, shard, FAST).delta)
    prox = l2_norm(task.train(params, shard, FAST.model_copy(update={"mu": 0.1})).delta)
    assert prox < 0.5 * plain
    # an explicit global model is the centre of the pull: starting there changes nothing
    same = task.train(params, shard, FAST.model_copy(update={"mu": 0.1}), global_params=params)
    assert math.isclose(l2_norm(same.delta), prox, rel_tol=1e-6)


def test_accumulating_two_batches_of_16_matches_one_batch_of_32(task: DigitsTask) -> None:
    params, shard = task.init_params(0), task.device_data(0, 4)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1)
    big = task.train(params, shard, cfg)
    accum = task.train(params, shard, cfg.model_copy(update={"batch_size": 16, "accum": 2}))
    small = task.train(params, shard, cfg.model_copy(update={"batch_size": 16}))
    assert big.metrics["steps"] == accum.metrics["steps"] == 2 * math.ceil(360 / 32)
    assert small.metrics["steps"] == 2 * math.ceil(360 / 16)
    for name in big.delta:
        np.testing.assert_allclose(accum.delta[name], big.delta[name], atol=1e-5)
    diff = l2_norm({k: small.delta[k] - big.delta[k] for k in big.delta})
    assert diff > 0.01


def test_tiny_clip_bounds_every_step(task: DigitsTask) -> None:
    params, shard = task.init_params(0), task.device_data(0, 4)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1)
    free = task.train(params, shard, cfg)
    clipped = task.train(params, shard, cfg.model_copy(update={"clip": 1e-3}))
    # plain SGD: each step moves at most lr * clip
    bound = clipped.metrics["steps"] * cfg.lr * 1e-3
    assert l2_norm(clipped.delta) <= bound * 1.0001
    assert l2_norm(clipped.delta) < 0.1 * l2_norm(free.delta)


def test_adam_trains_too(task: DigitsTask) -> None:
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.01, optimizer="adam", weight_decay=1e-4)
    result = task.train(task.init_params(0), task.device_data(0, 4), cfg)
    assert result.metrics["loss"] < 0.5 * result.metrics["loss_before"]


def test_bf16_autocast_on_cpu_trains(task: DigitsTask) -> None:
    result = task.train(task.init_params(0), task.device_data(0, 4), FAST, precision="bf16")
    assert result.metrics["mixed_precision"] == 1.0
    assert result.metrics["loss"] < 0.5 * result.metrics["loss_before"]
    assert all(d.dtype == np.float32 for d in result.delta.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where CUDA is absent")
def test_fp16_without_cuda_falls_back_to_fp32_and_warns_once(
    task: DigitsTask, caplog: pytest.LogCaptureFixture
) -> None:
    from edgefl.tasks import training

    training._warned.discard("fp16-cpu")
    params, shard = task.init_params(0), task.device_data(0, 10)
    with caplog.at_level(logging.WARNING, logger="edgefl.tasks.training"):
        half = [task.train(params, shard, FAST, precision="fp16") for _ in range(2)]
    full = task.train(params, shard, FAST, precision="fp32")
    assert sum("fp16" in r.message for r in caplog.records) == 1
    assert half[0].metrics["mixed_precision"] == 0.0
    assert all(np.array_equal(half[0].delta[k], full.delta[k]) for k in full.delta)


def test_unknown_precision_or_device_is_refused(task: DigitsTask) -> None:
    params, shard = task.init_params(0), task.device_data(0, 10)
    with pytest.raises(ValueError, match="precision"):
        task.train(params, shard, FAST, precision="int8")
    with pytest.raises(ValueError, match="device"):
        task.train(params, shard, FAST, device="tpu")


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: fp16 mixed precision needs one"
)
def test_cuda_fp16_with_grad_scaler_trains() -> None:
    task = DigitsTask(model="cnn")
    params, shard = task.init_params(0), task.device_data(0, 4)
    result = task.train(params, shard, FAST, precision="fp16", device="cuda")
    assert result.metrics["mixed_precision"] == 1.0
    assert result.metrics["loss"] < 0.5 * result.metrics["loss_before"]
    assert all(np.isfinite(d).all() and d.dtype == np.float32 for d in result.delta.values())
    auto = task.train(params, shard, FAST, precision="auto", device="auto")
    assert auto.metrics["mixed_precision"] == 1.0


# ------------------------------------------------------------------- load_task


def test_load_task_by_builtin_name_and_by_module_path() -> None:
    mlp = load_task("digits", partition="dirichlet", alpha=0.3, seed=2)
    assert isinstance(mlp, DigitsTask)
    assert (mlp.partition, mlp.alpha, mlp.seed) == ("dirichlet", 0.3, 2)
    cnn = load_task("edgefl.tasks.digits:DigitsTask", model="cnn")
    assert isinstance(cnn, DigitsTask)
    assert "features.0.weight" in cnn.spec()


def test_load_task_accepts_an_instance_or_a_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_fleet_task.py").write_text(
        textwrap.dedent(
            """
            from edgefl.tasks.digits import DigitsTask
            TASK = DigitsTask(model="cnn")
            def make(**options):
                return DigitsTask(**options)
            NOT_A_TASK = 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        instance = load_task("my_fleet_task:TASK")
        assert isinstance(instance, DigitsTask) and instance.model == "cnn"
        made = load_task("my_fleet_task:make", partition="shards")
        assert isinstance(made, DigitsTask) and made.partition == "shards"
        with pytest.raises(ValueError, match="ready-made instance"):
            load_task("my_fleet_task:TASK", model="mlp")
        with pytest.raises(ValueError, match="not a Task"):
            load_task("my_fleet_task:NOT_A_TASK")
    finally:
        sys.modules.pop("my_fleet_task", None)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("mnist", "unknown task 'mnist'.*built-in name"),
        ("", "unknown task"),
        (":DigitsTask", "unknown task"),
        ("edgefl.tasks.digits:", "unknown task"),
        ("edgefl.no_such_module:Task", "cannot import module 'edgefl.no_such_module'"),
        ("edgefl.tasks.digits:NoSuchTask", "has no attribute 'NoSuchTask'"),
        ("edgefl.tasks.digits:PARTITIONS", "not a Task"),
    ],
)
def test_bad_task_refs_raise_value_error_saying_why(ref: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_task(ref)


def test_bad_digits_options_are_refused() -> None:
    with pytest.raises(ValueError, match="model"):
        load_task("digits", model="resnet")
    with pytest.raises(ValueError, match="partition"):
        load_task("digits", partition="zipf")


def test_device_data_without_index_is_the_tensors_as_given() -> None:
    data = DeviceData(torch.zeros(5, 64), torch.zeros(5, dtype=torch.long))
    assert len(data) == 5 and data.x.shape == (5, 64)
    with pytest.raises(ValueError, match="rows"):
        DeviceData(torch.zeros(5, 64), torch.zeros(4, dtype=torch.long))
