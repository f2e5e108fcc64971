from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest

from edgefl.checkpoint import MAGIC, CheckpointStore, NodeState, Published, decode, encode


def _state(version: int, round_: int | None = None, seed: int = 0) -> NodeState:
    rng = np.random.default_rng(seed)
    return NodeState(
        params={
            "fc.weight": rng.standard_normal((4, 3)).astype(np.float32),
            "fc.bias": rng.standard_normal(3).astype(np.float32),
        },
        version=version,
        round=version * 2 if round_ is None else round_,
        parent_version=version - 1 if version else None,
        last_seq={"dev-1": version, "dev-2": 10 * version},
        extra={"selected_at": {"dev-1": 3}},
    )


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45], dtype=np.float32)
    state = NodeState(
        params={
            "w": np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, ::2],  # not contiguous
            "special": special,
            "scalar": np.array(3.5, dtype=np.float32),
            "empty": np.zeros((0, 5), dtype=np.float32),
        },
        version=7,
        round=19,
        parent_version=None,
        last_seq={"dev-a": 0, "dev-b": 2**40},
        extra={"rejected": {"stale": 3}, "blob": b"\x00\xff", "ratio": 0.25, "ids": ["x"]},
    )
    store = CheckpointStore(tmp_path)
    store.save(state)
    got = store.load()
    assert got is not None
    assert list(got.params) == list(state.params)
    for name, arr in state.params.items():
        assert got.params[name].dtype == arr.dtype
        assert got.params[name].shape == arr.shape
        assert got.params[name].tobytes() == np.ascontiguousarray(arr).tobytes()
        assert got.params[name].flags.writeable
    assert (got.version, got.round, got.parent_version) == (7, 19, None)
    assert got.last_seq == state.last_seq
    assert got.extra == state.extra


def test_file_starts_with_magic_and_a_verifiable_header(tmp_path: Path) -> None:
    path = CheckpointStore(tmp_path).save(_state(3))
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    assert path.name == "state-0000000001-v3-r6.ckpt"
    assert decode(data).version == 3
    assert len(data) == sum(len(piece) for piece in encode(_state(3)))
    header_len = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "little")
    header = msgspec.msgpack.decode(data[len(MAGIC) + 4 : len(MAGIC) + 4 + header_len])
    assert header["format"] == 2
    assert header["length"] == len(data) - len(MAGIC) - 4 - header_len


def test_empty_directory_loads_none_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert CheckpointStore(tmp_path / "new").load() is None
    assert caplog.records == []


def _truncate(data: bytes) -> bytes:
    return data[:-10]


def _flip_a_body_bit(data: bytes) -> bytes:
    return data[:-20] + bytes([data[-20] ^ 0x01]) + data[-19:]


@pytest.mark.parametrize(
    ("damage", "why"), [(_truncate, "truncated"), (_flip_a_body_bit, "sha256 mismatch")]
)
def test_damaged_newest_falls_back_to_previous_with_one_warning(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[bytes], bytes],
    why: str,
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    newest = store.save(_state(2))
    newest.write_bytes(damage(newest.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="edgefl.checkpoint"):
        got = CheckpointStore(tmp_path).load()
    assert got is not None and got.version == 1
    assert got.last_seq == {"dev-1": 1, "dev-2": 10}
    (warning,) = _warnings(caplog)
    assert newest.name in warning and why in warning
    assert (tmp_path / (newest.name + ".corrupt")).exists()


def test_unrelated_files_are_ignored_and_garbage_generations_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(4))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "state-abc.ckpt").write_bytes(b"junk")
    (tmp_path / "state-0000000099-v1-r1.ckpt").write_bytes(b"\x93garbage msgpack")
    (tmp_path / "state-0000000098-v1-r1.ckpt").write_bytes(MAGIC + b"\xff\xff\xff\x7f")
    with caplog.at_level(logging.WARNING, logger="edgefl.checkpoint"):
        got = store.load()
    assert got is not None and got.version == 4
    warnings = _warnings(caplog)
    assert len(warnings) == 2
    assert "state-0000000099" in warnings[0] and "bad magic" in warnings[0]
    assert "state-0000000098" in warnings[1] and "bad header" in warnings[1]
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "state-abc.ckpt").exists()


def test_every_generation_damaged_loads_none_and_logs_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = CheckpointStore(tmp_path).save(_state(1))
    path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="edgefl.checkpoint"):
        assert CheckpointStore(tmp_path).load() is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.ERROR]


def test_only_keep_generations_remain_newest_first(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for v in range(1, 6):
        store.save(_state(v))
    assert _files(tmp_path) == ["state-0000000004-v4-r8.ckpt", "state-0000000005-v5-r10.ckpt"]
    store3 = CheckpointStore(tmp_path, keep=3)
    store3.save(_state(6))
    store3.save(_state(7))
    assert len(_files(tmp_path)) == 3
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, keep=0)


def test_newest_save_wins_even_when_the_version_goes_down(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(9))
    store.save(_state(2, round_=30))  # e.g. the node adopted a parent model with a lower version
    got = store.load()
    assert got is not None and (got.version, got.round) == (2, 30)


def test_a_damaged_generation_never_displaces_a_good_one_when_pruning(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    store.save(_state(1))
    bad = store.save(_state(2))
    bad.write_bytes(b"EDGEFLCK")
    assert (loaded := store.load()) is not None and loaded.version == 1
    store.save(_state(3))
    names = [n for n in _files(tmp_path) if n.endswith(".ckpt")]
    assert names == ["state-0000000001-v1-r2.ckpt", "state-0000000003-v3-r6.ckpt"]
    bad_new = tmp_path / names[1]
    bad_new.write_bytes(b"")
    assert (loaded := store.load()) is not None and loaded.version == 1


def _save_and_die_before_rename(directory: str, state: NodeState) -> None:
    def crash(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = crash  # type: ignore[assignment]  # only in this forked child
    CheckpointStore(directory).save(state)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_crash_between_temp_write_and_rename_keeps_previous_and_cleans_temp(
    tmp_path: Path,
) -> None:
    CheckpointStore(tmp_path).save(_state(1))
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_save_and_die_before_rename, args=(str(tmp_path), _state(2)))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    leftovers = [n for n in _files(tmp_path) if n.startswith(".tmp-")]
    assert len(leftovers) == 1
    assert (tmp_path / leftovers[0]).stat().st_size > 0  # fully written, never renamed

    store = CheckpointStore(tmp_path)
    assert _files(tmp_path) == ["state-0000000001-v1-r2.ckpt"]
    got = store.load()
    assert got is not None and got.version == 1
    assert store.save(_state(2)).name == "state-0000000002-v2-r4.ckpt"


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1))

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        store.save(_state(2))
    monkeypatch.undo()
    assert _files(tmp_path) == ["state-0000000001-v1-r2.ckpt"]


def test_the_published_mark_survives_reopening_and_is_never_below_a_saved_version(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    assert store.published() == Published(-1, False, 0)
    store.save(_state(3))
    assert store.published().version == 3  # a node saves a version before publishing it
    store.mark_published(Published(version=5, whole=False, chunks=7))
    assert CheckpointStore(tmp_path).published() == Published(5, False, 7)
    assert [n for n in _files(tmp_path) if n.startswith(".tmp-")] == []


def test_a_fallback_to_an_older_generation_keeps_the_highest_version_published(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    newest = store.save(_state(2))
    store.mark_published(Published(version=2, whole=True))
    newest.write_bytes(newest.read_bytes()[:-3])
    loaded = CheckpointStore(tmp_path).load()
    assert loaded is not None and loaded.version == 1
    assert CheckpointStore(tmp_path).published().version == 2
    (tmp_path / "published.mark").unlink()  # even without the mark: the damaged file's name
    assert CheckpointStore(tmp_path).published() == Published(2, True, 0)


def test_an_unreadable_mark_is_logged_and_assumes_a_whole_model_may_be_retained(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(4))
    (tmp_path / "published.mark").write_bytes(b"\xc1")
    with caplog.at_level(logging.WARNING, logger="edgefl.checkpoint"):
        assert store.published() == Published(4, True, 0)
    assert len(_warnings(caplog)) == 1


def test_a_body_whose_params_do_not_parse_is_corrupt_even_with_a_valid_checksum() -> None:
    import hashlib

    from edgefl.checkpoint import CorruptCheckpoint

    good = msgspec.msgpack.decode(encode(_state(2))[3])
    for params in (b"\x93garbage", msgspec.msgpack.encode([["w", [3], b"\x00" * 5]])):
        body = msgspec.msgpack.encode({**good, "params": params})
        header = msgspec.msgpack.encode(
            {"format": 2, "length": len(body), "sha256": hashlib.sha256(body).digest()}
        )
        data = MAGIC + len(header).to_bytes(4, "little") + header + body
        with pytest.raises(CorruptCheckpoint, match="bad body"):
            decode(data)
