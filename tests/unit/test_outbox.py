from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import edgefl
from edgefl.outbox import DiskFull, Entry, Outbox

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
        assert box.backlog().bytes == sum(range(1, 6))
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
        assert box.backlog().bytes == 4
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
        assert box.backlog().bytes == 100
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


# ---------------------------------------------------------- delivery and receipts

INC_MAX = 2**53


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _three(box: Outbox, sender: str = "dev") -> list[int]:
    return [box.put_with_seq(sender, "t", lambda s: b"u%d" % s)[0] for _ in range(3)]


def test_a_delivered_entry_stays_until_a_receipt_of_this_incarnation_covers_its_seq(
    tmp_path: Path,
) -> None:
    with Outbox(tmp_path / "o.db") as box:
        a, b, c = _three(box)
        box.mark_delivered(a)
        box.mark_delivered(b)
        assert (len(box), box.backlog().unreceipted, box.backlog().bytes) == (1, 2, 2)
        assert [(e.seq, e.deliveries) for e in box.peek()] == [(0, 1), (1, 1), (2, 0)]
        assert box.settle("dev", box.incarnation + 1, 5) == 0  # an earlier file's receipt
        assert box.settle("other", box.incarnation, 5) == 0
        assert box.settle("dev", box.incarnation, 0) == 1
        assert [e.id for e in box.peek()] == [b, c]
        # c was never acknowledged: it may be behind a later seq that overtook it (its
        # publish timed out), and the node has not seen it. It stays, to be sent.
        assert box.settle("dev", box.incarnation, 2) == 1
        assert [e.id for e in box.peek()] == [c] and len(box) == 1
        box.mark_delivered(c)
        assert box.settle("dev", box.incarnation, 2) == 1
        assert box.peek() == []


def test_an_entry_stored_without_a_seq_leaves_at_its_puback(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        entry_id = box.put("t", b"sync")
        box.mark_delivered(entry_id)
        assert box.peek() == [] and box.backlog().unreceipted == 0


def test_due_holds_the_undelivered_the_earlier_session_and_the_late_receipts(
    tmp_path: Path,
) -> None:
    clock = Clock()
    with Outbox(tmp_path / "o.db", clock=clock) as box:
        a, b, c = _three(box)
        box.mark_delivered(a)  # at 1000
        clock.now = 1004.0
        box.mark_delivered(b)

        def due(**kw: float) -> list[int]:
            return [e.id for e in box.due(10, resend_after=10.0, **kw)]

        assert due() == [c]
        assert due(since=1002.0) == [a, c]  # a new session since a was acknowledged
        assert due(after=c) == []
        clock.now = 1010.0
        assert due() == [a, c]  # a's receipt is 10 s late
        box.mark_delivered(a)  # sent again: the next wait doubles
        clock.now = 1029.0
        assert due() == [b, c]
        clock.now = 1030.0
        assert due() == [a, b, c]
        assert due(after=a) == [b, c]
        assert [e.id for e in box.due(1, resend_after=10.0)] == [a]


def test_each_file_draws_one_incarnation_and_keeps_it(tmp_path: Path) -> None:
    with Outbox(tmp_path / "a.db") as box:
        first = box.incarnation
    with Outbox(tmp_path / "a.db") as box:
        assert box.incarnation == first
    with Outbox(tmp_path / "b.db") as other:
        assert other.incarnation != first
    assert 1 <= first <= INC_MAX


def test_caps_forget_delivered_entries_before_dropping_undelivered_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="edgefl.outbox"),
        Outbox(tmp_path / "o.db", max_entries=3) as box,
    ):
        box.mark_delivered(_three(box)[1])
        box.put_with_seq("dev", "t", lambda s: b"u3")
        assert [e.seq for e in box.peek()] == [0, 2, 3]
        assert (box.evicted, box.dropped) == (1, 0)
        assert caplog.records == []  # forgetting a delivered update loses no work
        box.put_with_seq("dev", "t", lambda s: b"u4")
        assert [e.seq for e in box.peek()] == [2, 3, 4]
        assert (box.evicted, box.dropped) == (1, 1)
    assert len(caplog.records) == 1


def test_an_outbox_file_from_before_receipts_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    db = sqlite3.connect(path)
    db.executescript(
        "PRAGMA journal_mode=WAL;"
        "CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
        " payload BLOB NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);"
        "CREATE TABLE seqs (sender TEXT PRIMARY KEY, next INTEGER NOT NULL);"
        "INSERT INTO entries (topic, payload, created) VALUES ('t', x'01', 1.0);"
        "INSERT INTO seqs VALUES ('dev', 7);"
    )
    db.close()
    with Outbox(path) as box:
        (old,) = box.peek()
        assert (old.payload, old.seq, old.delivered) == (b"\x01", None, None)
        assert box.put_with_seq("dev", "t", lambda s: b"new")[1] == 7
        box.mark_delivered(old.id)  # no seq: no receipt can name it
        assert [e.seq for e in box.peek()] == [7]
        assert box._conn().execute("PRAGMA auto_vacuum").fetchone()[0] == 1


# ------------------------------------------------------- a lost or damaged file


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _damaged_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)  # the header survives, the tables do not
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_empty, _garbage, _damaged_pages])
def test_an_unreadable_file_is_set_aside_with_one_error_and_replaced_by_a_new_incarnation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        for _ in range(20):
            box.put_with_seq("dev", "t", lambda s: os.urandom(3000))
        old = box.incarnation
    damage(path)
    with caplog.at_level(logging.INFO, logger="edgefl.outbox"), Outbox(path) as box:
        assert box.incarnation != old
        assert len(box) == 0 and box.next_seq("dev") == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "moved aside" in errors[0].getMessage()
    (aside,) = tmp_path.glob("o.db.corrupt-*")
    assert aside.name.startswith(f"o.db.corrupt-{int(time.time()) // 100}")
    assert (aside.stat().st_size == 0) == (damage is _empty)


# ---------------------------------------------------------- bounded storage


def test_the_wal_is_checkpointed_and_stays_small_round_after_round(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        for _ in range(40):  # a device's round: progress, update, PUBACK, receipt
            box.set_state("progress", os.urandom(100_000))
            entry_id, seq = box.put_with_seq("dev", "t", lambda s: os.urandom(25_000))
            box.mark_delivered(entry_id)
            box.settle("dev", box.incarnation, seq)
            assert os.path.getsize(f"{path}-wal") <= 256 * 1024
        assert os.path.getsize(path) <= 256 * 1024  # the freed pages went back


def _cap_pages(box: Outbox, pages: int) -> None:
    """sqlite's page limit: past it a write fails as on a full disk (SQLITE_FULL)."""
    box._conn().execute(f"PRAGMA max_page_count={pages}")


def test_a_full_disk_drops_the_oldest_to_make_room_and_logs_one_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="edgefl.outbox"), Outbox(tmp_path / "o.db") as box:
        _cap_pages(box, 60)  # 240 KiB
        for _ in range(30):
            box.set_state("progress", b"p" * 20_000)
            entry_id, _ = box.put_with_seq("dev", "t", lambda s: os.urandom(20_000))
            box.mark_delivered(entry_id)
        kept = box.backlog().unreceipted
        assert 3 <= kept < 12 and box.evicted == 30 - kept and box.dropped == 0
        assert [e.seq for e in box.peek(100)] == list(range(30 - kept, 30))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "disk is full" in errors[0].getMessage()


def test_a_write_that_cannot_fit_raises_disk_full_and_the_outbox_recovers_with_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="edgefl.outbox"), Outbox(tmp_path / "o.db") as box:
        box.put_with_seq("dev", "t", lambda s: b"old")
        _cap_pages(box, box._conn().execute("PRAGMA page_count").fetchone()[0] + 2)
        with pytest.raises(DiskFull, match="full"):
            box.put_with_seq("dev", "t", lambda s: os.urandom(50_000))
        assert box.peek() == [] and box.dropped == 1  # it tried: the old one made room
        assert box.next_seq("dev") == 1  # the failed put took no seq
        _cap_pages(box, 1_000_000)
        box.put_with_seq("dev", "t", lambda s: os.urandom(50_000))
        assert len(box) == 1
    assert "room again" in caplog.records[-1].getMessage()


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system (tmpfs; needs root)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root on Linux")
    disk = tmp_path / "disk"
    _tmpfs(disk, "1m")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_on_a_1_mib_disk_rounds_go_on_keeping_what_fits_and_a_restart_opens_it(
    tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tiny_disk / "device.db"
    with caplog.at_level(logging.INFO, logger="edgefl.outbox"):
        with Outbox(path) as box:
            for _ in range(40):  # no receipts: what a node of an older version does
                box.set_state("progress", os.urandom(100_000))
                entry_id, _ = box.put_with_seq("dev", "t", lambda s: os.urandom(25_000))
                box.mark_delivered(entry_id)
            kept = box.backlog().unreceipted
            assert 10 <= kept < 40 and box.evicted == 40 - kept
        with Outbox(path) as box:  # even with the disk full to the last page
            assert box.backlog().unreceipted == kept and box.next_seq("dev") == 40
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) <= 2


def test_a_disk_filled_by_others_makes_puts_fail_until_space_returns(tiny_disk: Path) -> None:
    with Outbox(tiny_disk / "device.db") as box:
        box.put_with_seq("dev", "t", lambda s: b"first")
        filler = tiny_disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 4096)
        os.close(fd)
        with pytest.raises(DiskFull):
            box.put_with_seq("dev", "t", lambda s: os.urandom(200_000))
        filler.unlink()
        box.put_with_seq("dev", "t", lambda s: os.urandom(200_000))
        assert box.next_seq("dev") == 2
