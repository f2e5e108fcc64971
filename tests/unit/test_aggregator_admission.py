"""Admission of updates: every rejection reason, its order, and staleness weights."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl import codecs
from edgefl.aggregator.admission import Rejections, UpdateGate
from edgefl.codecs import decode_params, encode_params
from edgefl.fedavg import staleness_weight
from edgefl.params import l2_norm
from edgefl.wire import QTensor, Reason, Rejected, Update, encode_update, sign

SPEC = {"w": (2, 3)}
KEY = bytes(range(16))


def _update(sender: str = "d1", seq: int = 0, base: int = 3, value: float = 0.1, **kw: object):
    delta = {"w": np.full((2, 3), value, np.float32)}
    return Update(
        sender=sender, seq=seq, round=0, base=base, n=5, tensors=encode_params(delta, "f32"), **kw
    )


def _gate(**kw: object) -> UpdateGate:
    options: dict[str, object] = {"max_bytes": 4096, "max_staleness": 2}
    options.update(kw)
    return UpdateGate(SPEC, **options)  # type: ignore[arg-type]


def _norm(tensors: list[QTensor]) -> float:
    return math.sqrt(codecs.squared_norm(tensors, codecs.Scratch()))


def _reason(gate: UpdateGate, payload: bytes, sender: str = "d1", version: int = 3) -> Reason:
    with pytest.raises(Rejected) as info:
        gate.admit(payload, sender, version, measure=_norm)
    return info.value.reason


def test_valid_update_is_admitted_with_its_staleness_weight_and_capped_samples() -> None:
    gate = _gate(staleness="polynomial", staleness_a=0.5)
    ok = gate.admit(encode_update(_update(base=1)), "d1", 3, bound=lambda _: 4, measure=_norm)
    assert ok.samples == 4  # n = 5, capped by the child's bound
    assert ok.norm == pytest.approx(math.sqrt(6 * 0.01), rel=1e-6)
    assert gate.weight(ok, 3) == pytest.approx(4 * staleness_weight(2, "polynomial", 0.5))
    assert gate.ledger.seen("d1", 0, 0) and not gate.ledger.seen("d1", 0, 1)


def test_every_reason_is_raised_by_its_own_check() -> None:
    gate = _gate(keys={"signed": KEY}, max_norm=1.0, allowed=None)
    good = encode_update(_update())
    assert _reason(gate, b"\x00garbage") is Reason.MALFORMED
    assert _reason(gate, good + b"\x00" * 5000) is Reason.OVERSIZED
    wrong = msgspec.structs.replace(
        _update(seq=10), tensors=encode_params({"w": np.zeros(6)}, "f32")
    )
    assert _reason(gate, encode_update(wrong)) is Reason.SHAPE
    nan = msgspec.msgpack.decode(encode_update(_update(seq=11)))
    nan["tensors"][0].update(codec="u8", q=bytes(6), lo=float("nan"))
    assert _reason(gate, msgspec.msgpack.encode(nan)) is Reason.NONFINITE
    assert _reason(gate, good, sender="d2") is Reason.UNKNOWN_SENDER  # topic != payload
    gate.admit(good, "d1", 3, measure=_norm)
    assert _reason(gate, good) is Reason.DUPLICATE
    gate.ledger.settle("d1", 0, 0)  # its round closed
    assert _reason(gate, encode_update(_update(seq=1, base=0))) is Reason.STALE
    assert _reason(gate, encode_update(_update(seq=2, base=4))) is Reason.STALE  # unknown base
    # A device's stale update is settled: its receipt lets it forget it.
    assert gate.ledger.receipt("d1") == (0, 2)
    with pytest.raises(Rejected):  # a node's stale sync is not: its receipt decides
        gate.admit(
            encode_update(_update("gw", seq=0, base=0)), "gw", 3, settles_stale=lambda _: False
        )
    assert gate.ledger.receipt("gw") is None
    assert _reason(gate, encode_update(_update(seq=2, base=3))) is Reason.DUPLICATE
    forged = sign(_update("signed"), b"wrong key")
    assert _reason(gate, encode_update(forged), sender="signed") is Reason.BAD_SIGNATURE
    assert _reason(gate, encode_update(_update("signed")), sender="signed") is Reason.BAD_SIGNATURE
    assert _reason(gate, encode_update(_update(seq=3, value=1.0))) is Reason.NORM
    # The signature is checked before staleness: a wrong key on an old base is a forgery.
    old = sign(_update("signed", base=0), b"wrong key")
    assert _reason(gate, encode_update(old), sender="signed") is Reason.BAD_SIGNATURE
    gate.admit(encode_update(sign(_update("signed"), KEY)), "signed", 3)
    # Rejections never take a seq: only d1/0 and signed/0 are in the ledger.
    assert gate.ledger.seen("signed", 0, 0) and not gate.ledger.seen("d1", 0, 4)


def test_unknown_senders_by_allow_list_or_missing_status() -> None:
    payload = encode_update(_update())
    assert _reason(_gate(allowed=frozenset({"d9"})), payload) is Reason.UNKNOWN_SENDER
    with pytest.raises(Rejected):
        _gate().admit(payload, "d1", 3, known=lambda s: s == "d9")
    assert _gate().admit(payload, "d1", 3, known=lambda s: s == "d1").update.sender == "d1"


def test_required_signature_rejects_unsigned_updates_without_a_key() -> None:
    gate = _gate(require_signature=True)
    assert _reason(gate, encode_update(_update())) is Reason.BAD_SIGNATURE
    star = _gate(keys={"*": KEY}, require_signature=True)
    assert star.admit(encode_update(sign(_update(), KEY)), "d1", 3).update.sender == "d1"


def test_quantized_values_that_overflow_float32_are_nonfinite() -> None:
    huge = QTensor(name="w", shape=[2, 3], lo=3e38, scale=1e37, q=bytes([255] * 6))
    update = msgspec.structs.replace(_update(), tensors=[huge])
    assert _reason(_gate(), encode_update(update)) is Reason.NONFINITE


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=64),
    st.booleans(),
)
def test_update_norm_matches_the_norm_of_the_dequantized_delta(
    values: list[float], f32: bool
) -> None:
    delta = {"v": np.array(values, np.float32)}
    tensors = encode_params(delta, "f32") if f32 else encode_params(delta)
    expected = l2_norm(decode_params(tensors))
    assert _norm(tensors) == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_a_norm_too_large_to_fold_is_nonfinite_even_when_every_value_is_finite() -> None:
    bomb = QTensor(name="w", shape=[2, 3], lo=0.0, scale=1.3e36, q=bytes([255] * 6))
    codecs.get("u8").check(bomb)  # every value is a finite float32
    update = msgspec.structs.replace(_update(), tensors=[bomb])
    assert _reason(_gate(), encode_update(update)) is Reason.NONFINITE


def test_a_new_incarnation_is_accepted_from_seq_zero_and_a_forged_seq_locks_nobody_out() -> None:
    gate = _gate()
    for seq in range(40):
        gate.admit(encode_update(_update(seq=seq)), "d1", 3)
        gate.ledger.settle("d1", 0, seq)
    assert _reason(gate, encode_update(_update(seq=3))) is Reason.DUPLICATE
    fresh = msgspec.structs.replace(_update(seq=0), inc=77)  # the device lost its outbox
    gate.admit(encode_update(fresh), "d1", 3)
    gate.ledger.settle("d1", 77, 0)
    gate.admit(encode_update(msgspec.structs.replace(_update(seq=2**53), inc=77)), "d1", 3)
    gate.ledger.settle("d1", 77, 2**53)
    for seq in range(1, 30):  # the real device goes on; the forged seq takes one slot
        gate.admit(encode_update(msgspec.structs.replace(_update(seq=seq), inc=77)), "d1", 3)
        gate.ledger.settle("d1", 77, seq)
    assert gate.ledger.receipt("d1") == (77, 29)
    gate.admit(encode_update(msgspec.structs.replace(_update(seq=31), inc=77)), "d1", 3)
    gate.ledger.take("d1", 77, 30)  # taken, not settled (carried to the next round)
    gate.ledger.settle("d1", 77, 31)
    assert gate.ledger.receipt("d1") == (77, 29)  # never past an update still open


def test_rejection_logging_is_bounded_for_unknown_senders_and_summarized(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    rejections = Rejections("gw", clock=lambda: now[0])
    caplog.set_level("WARNING")
    for i in range(5000):
        rejections.add(f"r{i}", Rejected(Reason.MALFORMED, "x"), known=False)
    rejections.add("d1", Rejected(Reason.MALFORMED, "x"), known=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 21 and "'d1'" in lines[-1]
    now[0] = 61.0
    rejections.summarize()
    assert (
        "4980 more messages rejected (malformed) from 1000+ senders"
        in caplog.records[-1].getMessage()
    )
    assert rejections.counts[Reason.MALFORMED] == 5001


def test_a_receipt_stops_at_a_lost_update_until_the_sender_gives_it_up() -> None:
    from edgefl.aggregator.ledger import Ledger

    ledger = Ledger()
    for seq in (0, 1, 3):  # 2 was lost on the way (a broker restarted without persistence)
        ledger.settle("d1", 7, seq)
    assert ledger.receipt("d1") == (7, 1)  # the device keeps 2 and resends it
    ledger.settle("d1", 7, 2)
    assert ledger.receipt("d1") == (7, 3)
    ledger.settle("d1", 7, 6)  # 4 and 5 dropped by the device's own caps ...
    assert ledger.receipt("d1") == (7, 3)
    ledger.note_low("d1", 7, 6)  # ... which it says: it keeps nothing below 6
    assert ledger.receipt("d1") == (7, 6)
    ledger.settle("d1", 7, 2**53)  # a forged huge seq: no run of seqs reaches it
    assert ledger.receipt("d1") == (7, 6)
    back = Ledger.from_state(ledger.to_state())
    assert back.receipt("d1") == (7, 6)


def test_a_lost_update_holds_the_receipt_while_many_later_ones_settle() -> None:
    from edgefl.aggregator.ledger import Ledger

    ledger = Ledger()
    for seq in range(71):
        ledger.settle("d7", 1, seq)
    for seq in range(72, 172):  # seq 71 was acknowledged by a broker that then restarted
        ledger.settle("d7", 1, seq)
    assert ledger.receipt("d7") == (1, 70) and not ledger.seen("d7", 1, 71)
    ledger.settle("d7", 1, 71)  # resent by the device, folded
    assert ledger.receipt("d7") == (1, 171)
