from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import edgefl
from edgefl.outbox import Entry, Outbox

REPO_ROOT = str(Path(edgefl.__file__).resolve().parents[1])


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_entries_come_back_oldest_first_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "outbox.db"
    with Outbox(path) as box:
        ids = [box.put(f"t/{i}", bytes([i]) * (i + 1)) for i in range(5)]
        assert ids == sorted(ids)
        assert len(box) == 5
        assert box.bytes == sum(range(1, 6))
    with Outbox(path) as box:
        entries = box.peek(limit=3)
        assert [e.topic for e in entries] == ["t/0", "t/1", "t/2"]
        assert [e.payload for e in entries] == [b"\x00", b"\x01\x01", b"\x02\x02\x02"]
        assert [e.id for e in box.peek(limit=100)] == ids
        assert all(isinstance(e, Entry) and e.attempts == 0 for e in entries)


def test_database_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        db = box._conn()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_ack_removes_exactly_that_entry_and_unknown_ids_are_ignored(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        a, b, c = (box.put("t", p) for p in (b"a", b"bb", b"ccc"))
        box.ack(b)
        assert [e.id for e in box.peek()] == [a, c]
        assert box.bytes == 4
        box.ack(b)
        box.ack(12345)
        assert len(box) == 2
    with Outbox(tmp_path / "o.db") as box:
        assert [e.payload for e in box.peek()] == [b"a", b"ccc"]


def test_acked_ids_are_never_reused(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        first = box.put("t", b"x")
        box.ack(first)
    with Outbox(tmp_path / "o.db") as box:
        assert box.put("t", b"y") > first


def test_mark_attempt_counts_per_entry(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        a = box.put("t", b"a")
        b = box.put("t", b"b")
        box.mark_attempt(a)
        box.mark_attempt(a)
        box.mark_attempt(999)
        assert {e.id: e.attempts for e in box.peek()} == {a: 2, b: 0}


def test_created_uses_the_injected_clock(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", clock=lambda: 1234.5) as box:
        box.put("t", b"a")
        assert box.peek()[0].created == 1234.5


def test_entry_cap_drops_oldest_counts_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="edgefl.outbox"),
        Outbox(tmp_path / "o.db", max_entries=3) as box,
    ):
        for i in range(5):
            box.put("t", bytes([i]))
        assert [e.payload for e in box.peek()] == [b"\x02", b"\x03", b"\x04"]
        assert box.dropped == 2
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert "dropped 1 oldest" in caplog.records[0].getMessage()
    with Outbox(tmp_path / "o.db", max_entries=3) as box:
        assert box.dropped == 2
        box.put("t", b"\x05")
        assert box.dropped == 3


def test_byte_cap_drops_as_many_oldest_as_needed(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=100) as box:
        for _ in range(3):
            box.put("t", b"x" * 30)  # 90 bytes
        box.put("t", b"y" * 70)  # 160 -> drop two oldest -> 100
        assert len(box) == 2
        assert box.bytes == 100
        assert box.dropped == 2
        assert box.peek()[-1].payload == b"y" * 70


def test_payload_larger_than_the_byte_cap_is_refused_and_nothing_is_dropped(
    tmp_path: Path,
) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=10) as box:
        box.put("t", b"keep")
        with pytest.raises(ValueError, match="max_bytes"):
            box.put("t", b"z" * 11)
        assert [e.payload for e in box.peek()] == [b"keep"]
        assert box.dropped == 0


def test_seq_is_per_sender_and_continues_after_reopen(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        assert [box.next_seq("dev-a") for _ in range(3)] == [0, 1, 2]
        assert box.next_seq("dev-b") == 0
    with Outbox(tmp_path / "o.db") as box:
        assert box.next_seq("dev-a") == 3
        assert box.next_seq("dev-b") == 1


def test_put_with_seq_stores_the_payload_built_for_its_seq(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.next_seq("d")
        entry_id, seq = box.put_with_seq("d", "edgefl/gw/update/d", lambda s: b"seq=%d" % s)
        assert seq == 1
        (entry,) = box.peek()
        assert (entry.id, entry.topic, entry.payload) == (entry_id, "edgefl/gw/update/d", b"seq=1")


def test_failed_build_stores_nothing_and_consumes_no_seq(tmp_path: Path) -> None:
    def boom(seq: int) -> bytes:
        raise RuntimeError("encoder failed")

    with Outbox(tmp_path / "o.db") as box:
        with pytest.raises(RuntimeError):
            box.put_with_seq("d", "t", boom)
        assert len(box) == 0
        assert box.put_with_seq("d", "t", lambda s: b"ok")[1] == 0


def test_state_round_trips_overwrites_and_survives_reopen(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        assert box.get_state("residual") is None
        box.set_state("residual", b"\x00\x01")
        box.set_state("residual", b"\x02" * 1000)
        box.set_state("model_version", b"7")
    with Outbox(tmp_path / "o.db") as box:
        assert box.get_state("residual") == b"\x02" * 1000
        assert box.get_state("model_version") == b"7"


def test_closed_outbox_refuses_calls(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.close()
    box.close()
    with pytest.raises(ValueError, match="closed"):
        box.put("t", b"x")


_WRITER = """
import sys
from edgefl.outbox import Outbox
box = Outbox(sys.argv[1])
while True:
    _, seq = box.put_with_seq("dev", "edgefl/gw/update/dev", lambda s: b"update-%d" % s)
    print(seq, flush=True)
"""


def test_sigkill_mid_writes_loses_no_returned_entry_and_seq_continues(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    child = _child(_WRITER, str(path))
    assert child.stdout is not None
    reported = [int(child.stdout.readline()) for _ in range(40)]
    child.send_signal(signal.SIGKILL)  # still writing: the kill lands mid-stream
    child.wait(timeout=10)
    child.stdout.close()
    assert reported == list(range(40))
    assert Path(f"{path}-wal").exists()  # not checkpointed: reopening must replay the WAL

    with Outbox(path) as box:
        entries = box.peek(limit=10_000)
        stored = len(entries)
        assert stored >= 40
        # Seqs and payloads went in together: 0..k-1, each payload built for its seq.
        assert [e.payload for e in entries] == [b"update-%d" % s for s in range(stored)]
        assert box.next_seq("dev") == stored


_SEQ_TAKER = """
import sys
from edgefl.outbox import Outbox
with Outbox(sys.argv[1]) as box:
    print(" ".join(str(box.next_seq("dev")) for _ in range(60)), flush=True)
"""


def test_two_processes_share_a_reopened_outbox_without_repeating_a_seq(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    crashed = _child(_WRITER, str(path))
    assert crashed.stdout is not None
    for _ in range(5):
        crashed.stdout.readline()
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(timeout=10)
    crashed.stdout.close()

    with Outbox(path) as box:
        start = box.next_seq("dev")
    takers = [_child(_SEQ_TAKER, str(path)) for _ in range(2)]
    seqs: list[int] = []
    for proc in takers:
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        seqs += [int(s) for s in out.split()]
    assert sorted(seqs) == list(range(start + 1, start + 121))
