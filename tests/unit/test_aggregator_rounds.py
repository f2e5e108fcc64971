"""Rounds, selection and sync bookkeeping of the aggregation node: pure rules, no broker."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.aggregator.admission import Admitted
from edgefl.aggregator.fold import RoundFold
from edgefl.aggregator.rounds import Round, apply_delta, quorum_target
from edgefl.aggregator.selection import Children, select
from edgefl.aggregator.uplink import Uplink
from edgefl.config import PolicySettings
from edgefl.device.policy import policy_of
from edgefl.quant import dequantize_params, float_params
from edgefl.wire import Reason, Status, Update, UpdateRejected


def _round(
    selected: tuple[str, ...] = (),
    deadline: float = 100.0,
    min_updates: int = 1,
    quorum: float = 1.0,
) -> Round:
    r = Round(0, 0, RoundFold(), min_updates, quorum, selected, deadline)
    r.announced = True
    return r


def _fold(r: Round, sender: str, value: float = 1.0, n: int = 1, seq: int = 0) -> bool:
    tensors = float_params({"x": np.full(2, value, np.float32)})
    update = Update(sender=sender, seq=seq, round=0, base=0, n=n, tensors=tensors)
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
    assert not _fold(r, "d1", seq=1)  # a second update from one child waits for the next round
    with pytest.raises(UpdateRejected) as third:
        _fold(r, "d1", seq=2)
    assert third.value.reason is Reason.REPEAT and list(r.carry) == ["d1"]
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


def test_updates_before_the_announcement_wait_for_it() -> None:
    r = Round(0, 0, RoundFold(), 1, 1.0)
    assert not _fold(r, "early")
    assert r.participants == 0 and list(r.waiting) == ["early"]
    r.announced = True
    assert r.open_waiting(lambda ok: float(ok.samples)) == []
    assert r.participants == 1 and r.updates == 1


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


def test_uplink_sends_only_unsent_work_so_two_syncs_never_count_twice() -> None:
    up = Uplink(reference=_params(0.0), parent_version=5)
    up.after_round(10)
    assert up.due(1) and not up.due(2)
    first = up.build(_params(1.0), sender="gw", seq=0, round=0, dtype="f32")
    up.sent(_params(1.0))
    up.after_round(20)
    second = up.build(_params(3.0), sender="gw", seq=1, round=1, dtype="f32")
    assert (first.base, first.n, second.base, second.n) == (5, 10, 5, 20)
    np.testing.assert_allclose(dequantize_params(first.tensors)["x"], 1.0)
    np.testing.assert_allclose(dequantize_params(second.tensors)["x"], 2.0)


def test_uplink_adoption_carries_unsent_work_onto_the_parent_model() -> None:
    up = Uplink(reference=_params(0.0), parent_version=0)
    model = up.adopt(_params(10.0), _params(0.5), 3)  # 0.5 of local work not yet sent
    np.testing.assert_allclose(model["x"], 10.5)
    assert up.parent_version == 3
    up.sent(model)
    assert up.adopt(_params(20.0), model, 4)["x"][0] == 20.0  # right after a sync: as is


def test_uplink_survives_a_checkpoint_round_trip_with_its_residual() -> None:
    up = Uplink(reference=_params(0.0), parent_version=2)
    up.after_round(7)
    up.build({"x": np.array([0.0, 0.3, 1.0], np.float32)}, sender="g", seq=0, round=0)
    back = Uplink.from_extra(up.to_extra(), 2)
    np.testing.assert_array_equal(back.feedback.residual["x"], up.feedback.residual["x"])
    assert (back.samples_since_sync, back.rounds_since_sync) == (7, 1)


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
