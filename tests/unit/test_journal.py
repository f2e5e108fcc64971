from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefl.aggregator.journal import Journal, replay


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.log")
    j.start()
    yield j
    j.close()


def test_appended_updates_come_back_in_order_after_reopening(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.log")
    j.start()
    for seq in range(3):
        assert j.append(("d1", 7, seq), bytes([seq]) * 10)
    j.append(("d2", 0, 0), b"x")
    j.close()
    again = Journal(tmp_path / "journal.log")
    assert again.entries() == [
        (("d1", 7, 0), b"\x00" * 10),
        (("d1", 7, 1), b"\x01" * 10),
        (("d1", 7, 2), b"\x02" * 10),
        (("d2", 0, 0), b"x"),
    ]
    again.close()


def test_retain_forgets_settled_entries_but_not_those_appended_after_it(journal: Journal) -> None:
    journal.append(("a", 0, 0), b"a0")
    journal.append(("b", 0, 0), b"b0")
    journal.retain({("b", 0, 0)})
    journal.append(("c", 0, 0), b"c0")
    assert journal.flush(5)
    assert [k for k, _ in journal.entries()] == [("b", 0, 0), ("c", 0, 0)]
    journal.retain(())
    assert journal.flush(5) and journal.entries() == []


def test_a_replayed_append_is_stored_once(journal: Journal) -> None:
    journal.append(("a", 0, 4), b"first")
    journal.append(("a", 0, 4), b"again")
    assert journal.flush(5)
    assert journal.entries() == [(("a", 0, 4), b"first")]


def test_past_its_bounds_the_journal_counts_instead_of_growing(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.log", max_entries=2, max_bytes=200)  # 28 B a header
    j.start()
    assert j.append(("a", 0, 0), b"x" * 60)
    assert not j.append(("a", 0, 1), b"x" * 120)  # bytes
    assert j.append(("a", 0, 2), b"x" * 10)
    assert not j.append(("a", 0, 3), b"x")  # entries
    j.retain({("a", 0, 2)})
    assert j.flush(5)
    assert j.append(("a", 0, 4), b"x" * 80)  # room again once the round is saved
    assert j.flush(5)
    assert (j.skipped, [k[2] for k, _ in j.entries()]) == (2, [2, 4])
    j.close()


def test_a_torn_last_record_is_cut_off_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.log"
    j = Journal(path)
    j.start()
    j.append(("a", 0, 0), b"whole")
    j.append(("a", 0, 1), b"torn by a kill")
    j.close()
    os.truncate(path, path.stat().st_size - 3)
    with caplog.at_level(logging.WARNING):
        again = Journal(path)
    assert again.entries() == [(("a", 0, 0), b"whole")] and "torn" in caplog.text
    again.start()
    again.append(("a", 0, 1), b"resent")  # lands after the last whole record
    again.close()
    third = Journal(path)
    assert [p for _, p in third.entries()] == [b"whole", b"resent"]
    third.close()


def _append_and_die(path: str) -> None:
    j = Journal(path)
    j.start()
    j.append(("d1", 0, 0), b"folded")
    j.flush(5)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_written_entry_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    child = multiprocessing.get_context("fork").Process(target=_append_and_die, args=(str(path),))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    j = Journal(path)
    assert j.entries() == [(("d1", 0, 0), b"folded")]
    j.close()


def test_replay_hands_back_a_senders_later_updates_for_after_the_announcement(
    journal: Journal,
) -> None:
    for key in [("a", 0, 0), ("b", 0, 0), ("a", 0, 1)]:
        journal.append(key, f"{key[0]}{key[2]}".encode())
    assert journal.flush(5)
    waiting: dict[str, bytes] = {}
    later = replay(journal, waiting.__setitem__, waiting.__contains__)
    assert waiting == {"a": b"a0", "b": b"b0"}
    assert later == [(("a", 0, 1), b"a1")]
