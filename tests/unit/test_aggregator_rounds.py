"""Rounds, selection and sync bookkeeping of the aggregation node: pure rules, no broker."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.aggregator.admission import Admitted
from edgefl.aggregator.fold import RoundFold
from edgefl.aggregator.rounds import Round, apply_delta, quorum_target
from edgefl.aggregator.selection import Children, select
from edgefl.aggregator.sync import ParentSync
from edgefl.codecs import decode_params, encode_params
from edgefl.config import PolicySettings
from edgefl.device.policy import policy_of
from edgefl.wire import Status, Update, encode_update


def _round(
    selected: tuple[str, ...] = (),
    deadline: float = 100.0,
    min_updates: int = 1,
    quorum: float = 1.0,
) -> Round:
    r = Round(0, 0, RoundFold(), min_updates, quorum, selected, deadline)
    r.announced = True
    return r


def _update(sender: str, value: float = 1.0, n: int = 1, seq: int = 0) -> Update:
    tensors = encode_params({"x": np.full(2, value, np.float32)}, "f32")
    return Update(sender=sender, seq=seq, round=0, base=0, n=n, tensors=tensors)


def _fold(r: Round, sender: str, value: float = 1.0, n: int = 1, seq: int = 0) -> Admitted | None:
    update = _update(sender, value, n, seq)
    return r.admit(sender, Admitted(update, n, abs(value) * np.sqrt(2)), float(n))


@pytest.mark.parametrize(
    ("min_updates", "quorum", "expected", "target"),
    [(1, 1.0, 0, 1), (1, 1.0, 5, 5), (1, 0.6, 5, 3), (4, 0.5, 4, 4), (2, 0.1, 30, 3)],
)
def test_quorum_target_is_the_larger_of_min_updates_and_the_fraction(
    min_updates: int, quorum: float, expected: int, target: int
) -> None:
    assert quorum_target(min_updates, quorum, expected) == target


def test_open_round_closes_when_every_online_eligible_child_answered() -> None:
    r = _round()
    kids = {"a", "b", "c"}
    assert r.ready(0.0, kids, kids) is None  # nothing folded yet
    _fold(r, "a")
    _fold(r, "b")
    assert r.ready(0.0, kids, kids) is None and not r.may_close(kids, kids)
    _fold(r, "c")
    assert r.ready(0.0, kids, kids) == "all" and r.may_close(kids, kids)


def test_quorum_fraction_closes_early_and_deadline_needs_one_update() -> None:
    kids = {f"d{i}" for i in range(10)}
    r = _round(deadline=10.0, min_updates=2, quorum=0.3)
    assert r.ready(11.0, kids, kids) is None and r.expired(11.0)
    _fold(r, "d0")
    assert r.ready(5.0, kids, kids) is None
    assert r.ready(10.0, kids, kids) == "deadline"
    _fold(r, "d1")
    assert _fold(r, "d1", seq=1) is None  # a second update waits for the next round
    third = _fold(r, "d1", seq=2)  # a third: the older of it and the carried one goes
    assert third is not None and third.update.seq == 1 and r.carry["d1"].update.seq == 2
    assert r.ready(5.0, kids, kids) is None
    _fold(r, "d2")
    assert r.ready(5.0, kids, kids) == "quorum" and r.may_close(kids, kids)


def test_selected_child_that_goes_offline_is_not_waited_for() -> None:
    r = _round(selected=("a", "b", "c"))
    _fold(r, "a")
    _fold(r, "b")
    online = {"a", "b", "c"}
    assert r.ready(0.0, online, online) is None
    online.discard("c")  # its last will arrived
    assert r.ready(0.0, online, online) == "all"


def test_round_with_no_known_child_waits_for_min_updates() -> None:
    r = _round(min_updates=2)
    _fold(r, "x")
    assert r.ready(0.0, set(), set()) is None
    _fold(r, "y")
    assert r.ready(0.0, set(), set()) == "quorum"


def test_round_average_is_sample_weighted_and_applied_as_a_delta() -> None:
    r = _round()
    _fold(r, "a", 1.0, n=1)
    _fold(r, "b", 4.0, n=3)
    delta, stats = r.average()
    np.testing.assert_allclose(delta["x"], [3.25, 3.25])
    assert (stats.clipped, stats.samples) == (0, 4)
    new = apply_delta({"x": np.zeros(2, np.float32)}, delta)
    assert new["x"].dtype == np.float32 and r.samples == 4 and r.participants == 2


def test_updates_carried_from_the_last_round_fold_at_the_announcement() -> None:
    r = Round(0, 0, RoundFold(), 1, 1.0)
    r.waiting = {"late": Admitted(_update("late", seq=0), 1, 1.0)}
    assert _fold(r, "early") is None  # before the announcement: folded, one per sender
    assert _fold(r, "late", seq=1) is None  # the carried one comes first: this one waits
    assert list(r.carry) == ["late"] and r.participants == 1
    r.announced = True
    assert r.open_waiting(lambda ok: float(ok.samples)) == []
    assert r.participants == 2 and r.updates == 2


def test_a_ghost_is_waited_for_max_misses_rounds_then_not_until_it_delivers() -> None:
    kids = Children(policy_of(PolicySettings()), max_misses=2)
    for child in ("real", "ghost"):
        kids.update(child, Status(online=True))
    for _ in range(2):
        assert "ghost" in kids.online_eligible
        kids.round_closed(set(kids.online_eligible), {"real"})
    assert set(kids.online_eligible) == {"real"} and "ghost" in kids.selectable
    kids.update("ghost", Status(online=True))  # a fresh status does not bring it back
    assert "ghost" not in kids.online_eligible
    kids.answered("ghost")
    assert "ghost" in kids.online_eligible


def test_the_children_table_is_bounded_and_evicts_offline_then_unproven_children() -> None:
    kids = Children(policy_of(PolicySettings()), max_children=3, max_samples=50)
    kids.update("a", Status(online=True, samples=10))
    kids.answered("a")
    kids.update("b", Status(online=False))
    kids.update("c", Status(online=True, samples=10**9))
    kids.update("d", Status(online=True))  # evicts b (offline)
    kids.update("e", Status(online=True))  # evicts c (never delivered)
    assert set(kids.known) == {"a", "d", "e"}
    kids.update("a", Status(online=True, samples=1000))  # a bound never rises
    assert (kids.bound("a"), kids.bound("d")) == (10, 50)
    allow = Children(policy_of(PolicySettings()), allowed=frozenset({"a"}))
    assert not allow.update("stranger", Status(online=True)) and len(allow) == 0


def test_selection_prefers_the_least_recently_selected_and_replays_with_the_seed() -> None:
    kids = [f"d{i}" for i in range(6)]
    first = select(kids, {}, 3, seed=7, round=0)
    assert first == select(kids, {}, 3, seed=7, round=0) and len(first) == 3
    last = dict.fromkeys(first, 0)
    second = select(kids, last, 3, seed=7, round=1)
    assert set(first).isdisjoint(second)  # everyone trains before anyone twice
    assert select(kids, {}, 0, seed=7, round=0) == ()  # open round
    assert len(select(kids, {}, 10, seed=7, round=0)) == 6


def test_children_policy_excludes_offline_low_battery_and_slow_links() -> None:
    kids = Children(
        policy_of(PolicySettings(min_battery=0.3, allowed_links=["wifi", "ethernet"])),
        expected_bytes=1_000_000,
        deadline_s=10.0,
    )
    kids.update("ok", Status(online=True, battery=0.9, charging=False, link="wifi"))
    kids.update("flat", Status(online=True, battery=0.1, charging=False, link="wifi"))
    kids.update("plugged", Status(online=True, battery=0.1, charging=True, link="ethernet"))
    kids.update("cell", Status(online=True, link="cellular"))
    kids.update("slow", Status(online=True, link="wifi", uplink_kbps=100.0))  # 80 s for 1 MB
    kids.update("says_no", Status(online=True, eligible=False, reason="too_hot"))
    kids.update("gone", Status(online=False))
    assert set(kids.online_eligible) == {"ok", "plugged"}
    assert "gone" in kids and "gone" not in kids.online
    kids.update("ok", None)  # retained status cleared
    assert "ok" not in kids and set(kids.online_eligible) == {"plugged"}


def _params(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full(3, value, np.float32)}


def _sync(up: ParentSync, model: float, seq: int, codec: str = "f32") -> Update:
    update = up.build(_params(model), sender="gw", seq=seq, round=seq, codec=codec)
    up.sent(update, encode_update(update))
    return update


def _sent(update: Update) -> float:
    return float(decode_params(update.tensors)["x"][0])


def test_the_sync_reference_moves_only_on_the_parents_receipt() -> None:
    up = ParentSync(reference=_params(0.0), parent_version=5)
    up.after_round(10)
    assert up.due(1) and not up.due(2)
    first = _sync(up, 1.0, seq=0)
    up.after_round(20)
    assert not up.due(1)  # one sync in flight at a time
    assert up.on_parent(5, 1, None) == "wait"  # not receipted yet
    assert up.on_parent(6, 2, (0, 0)) == "confirmed"  # (inc, seq): seq 0 is settled
    second = _sync(up, 3.0, seq=1)
    assert (first.base, first.n, second.n) == (5, 10, 20)
    assert (_sent(first), _sent(second)) == (1.0, 2.0)  # the receipted part is not sent again


def test_a_sync_the_parent_never_receipted_is_carried_whole_into_the_next() -> None:
    up = ParentSync(reference=_params(0.0), parent_version=0, max_staleness=2)
    up.after_round(10)
    lost = _sync(up, 1.0, seq=0)
    up.after_round(30)
    assert up.on_parent(2, 3, None) == "wait"  # two behind: the parent may still fold it
    assert up.on_parent(3, 4, None) == "refused"  # three: never
    again = _sync(up, 4.0, seq=1)
    assert (_sent(lost), _sent(again), again.n) == (1.0, 4.0, 40)  # both rounds, all samples


def test_a_folded_sync_whose_receipt_came_late_is_counted_once() -> None:
    up = ParentSync(reference=_params(0.0), parent_version=0, max_staleness=4)
    up.after_round(10)
    _sync(up, 1.0, seq=7)
    assert up.on_parent(1, 1, (0, 6)) == "wait"  # a receipt for an older seq
    model = up.adopt(_params(10.0), _params(1.0), 1)  # the sync's work is not in v1 yet
    assert model["x"][0] == 11.0
    assert up.on_parent(2, 2, (0, 7)) == "confirmed"  # now it is, in v2 and after
    assert up.adopt(_params(20.0), model, 2)["x"][0] == 20.0
    assert up.on_parent(3, 3, (0, 7)) == "none"
    assert up.on_parent(3, 3, (1, 9)) == "none"  # another incarnation's receipt names nothing


def test_an_unreceipted_sync_is_resent_when_the_parent_cannot_be_holding_it() -> None:
    up = ParentSync(reference=_params(0.0), parent_version=3, max_staleness=4)
    assert up.on_parent(3, 8, None) == "none"
    up.after_round(5)
    _sync(up, 1.0, seq=2)
    assert up.on_parent(3, 8, None) == "wait"  # the same announcement again (a reconnect)
    assert up.on_parent(3, 9, None) == "resend"  # same version, new round: a restart
    assert up.on_parent(3, 9, None, deadline=70.0) == "resend"  # a restart with no checkpoint
    assert up.on_parent(4, 10, None) == "wait"  # a round closed without it: maybe the next
    assert up.on_parent(5, 11, None) == "resend"  # two rounds closed without it
    assert up.on_parent(5, 11, (0, 2)) == "confirmed"


def test_u8_syncs_carry_their_quantization_error_into_the_next() -> None:
    rng = np.random.default_rng(0)
    work = {"x": rng.standard_normal(300).astype(np.float32)}
    up = ParentSync(reference={"x": np.zeros(300, np.float32)}, parent_version=0)
    total = np.zeros(300, np.float64)
    for seq in range(3):
        up.after_round(1)
        update = up.build(work, sender="gw", seq=seq, round=seq, codec="u8")
        up.sent(update, encode_update(update))
        total += decode_params(update.tensors)["x"]
        assert up.on_parent(seq + 1, seq + 1, (0, seq)) == "confirmed"
    assert np.abs(total - work["x"]).max() < 1e-5  # what was sent adds up to the work


def test_the_sync_in_flight_survives_a_checkpoint_round_trip() -> None:
    up = ParentSync(reference=_params(0.0), parent_version=2, max_staleness=3)
    up.after_round(7)
    update = _sync(up, 1.5, seq=4)
    up.after_round(2)
    back = ParentSync.from_extra(up.to_extra(), 2, max_staleness=3)
    assert back.inflight is not None and up.inflight is not None
    assert (back.inflight.seq, back.inflight.n, back.inflight.base) == (4, 7, 2)
    assert back.inflight.payload == encode_update(update)
    assert (back.samples_since_sync, back.rounds_since_sync) == (2, 1)
    assert back.on_parent(2, 5, None) == "wait"  # resent at the restart already
    assert back.on_parent(3, 6, (0, 4)) == "confirmed"
    assert back.reference["x"][0] == 1.5


def test_the_sync_state_round_trips_through_the_checkpoint_extra() -> None:
    up = ParentSync(_params(2.0), 1)
    up.after_round(4)
    back = ParentSync.from_extra(up.to_extra(), 1)
    assert back.inflight is None and back.samples_since_sync == 4
    assert np.array_equal(back.reference["x"], up.reference["x"])


def test_a_declared_sample_count_is_capped_at_a_multiple_of_the_median() -> None:
    kids = Children(policy_of(PolicySettings()), sample_ratio=1.5)
    for i, n in enumerate((40, 50, 60, 45)):
        kids.update(f"d{i}", Status(online=True, samples=n))
    kids.update("liar", Status(online=True, samples=10**12))
    assert kids.bound("liar") == 75  # 1.5 x the median of 40, 45, 50, 60, 10**12
    assert kids.bound("d2") == 60 and kids.bound("unknown") == 75


def test_a_child_that_declined_the_round_is_not_waited_for() -> None:
    r = _round()
    kids = {"a", "b"}
    _fold(r, "a")
    assert r.ready(0.0, kids, kids) is None
    r.declined.add("b")  # its Status said it declined this round
    assert r.ready(0.0, kids, kids) == "all"
