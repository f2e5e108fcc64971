"""Which updates a node has taken and settled, by (sender, incarnation, seq), and receipts.

An update is *taken* when admitted into a round and *settled* when that round is
saved (folded) or the update is refused for good; only settled ones are
checkpointed, so a restarted node accepts the redelivery of what it lost. An
announcement carries only the receipts that changed lately, so it stays small. Pure.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Settled seqs remembered exactly above a sender's floor (above a gap, since the run
#: from the floor is absorbed into it at once); past this, the lowest are given up.
WINDOW = 256
#: Announcements a receipt rides in after it changes. A child that missed them all
#: resends (after ``RESEND_MIN_S``); that settled update seen again brings it back.
RECEIPT_ANNOUNCEMENTS = 3


@dataclass
class _Seen:
    inc: int
    floor: int = -1  # every seq at or below it is settled
    top: set[int] = field(default_factory=set)  # settled seqs above the floor, past a gap
    last: int = -1  # the last seq settled, in order
    low: int = 0  # the sender's lowest kept seq: below it, nothing is waited for

    def has(self, seq: int) -> bool:
        return seq <= self.floor or seq in self.top

    def add(self, seq: int) -> None:
        self.last = seq
        if seq <= self.floor:
            return
        self.top.add(seq)
        self._absorb()
        while len(self.top) > WINDOW:
            # Give up the *lowest* gap: a forged huge seq takes one slot of the window
            # and never moves the floor, so the real sender's next seqs still land.
            self.floor = max(self.floor, min(self.top))
            self.top.discard(self.floor)
            self._absorb()

    def _absorb(self) -> None:
        while self.floor + 1 in self.top:
            self.floor += 1
            self.top.discard(self.floor)

    def receipt(self) -> int:
        """The end of the run of settled seqs from ``low`` (``low`` only moves the
        receipt, never the floor: a forged one cannot make real seqs duplicates)."""
        seq = max(self.floor, self.low - 1)
        while seq + 1 in self.top:
            seq += 1
        return seq


class Ledger:
    """Settled and taken updates per sender, bounded to ``max_senders`` (least recent out)."""

    def __init__(self, max_senders: int = 10_000) -> None:
        self.max_senders = max_senders
        self._settled: OrderedDict[str, _Seen] = OrderedDict()
        self._taken: dict[str, set[tuple[int, int]]] = {}
        #: announcements made, and per sender the count when its receipt last mattered
        self._announced = 0
        self._changed: dict[str, int] = {}

    def __contains__(self, sender: object) -> bool:
        return sender in self._settled

    def seen(self, sender: str, inc: int, seq: int) -> bool:
        """Whether this exact update was taken or settled already (a redelivery).

        A settled one sent again means its sender missed the receipt: the next
        announcements carry that receipt again."""
        if (inc, seq) in self._taken.get(sender, ()):
            return True
        entry = self._settled.get(sender)
        if entry is None or entry.inc != inc or not entry.has(seq):
            return False
        self._changed[sender] = self._announced
        return True

    def note_low(self, sender: str, inc: int, low: int) -> None:
        """The sender says it keeps nothing below ``low`` (dropped or receipted)."""
        entry = self._settled.get(sender)
        if entry is None or entry.inc != inc:
            entry = self._settled[sender] = _Seen(inc)
        entry.low = max(entry.low, low)
        self._changed[sender] = self._announced

    def take(self, sender: str, inc: int, seq: int) -> None:
        self._taken.setdefault(sender, set()).add((inc, seq))

    def settle(self, sender: str, inc: int, seq: int) -> None:
        """Folded into a saved round, or refused for good: the sender may forget it."""
        taken = self._taken.get(sender)
        if taken is not None:
            taken.discard((inc, seq))
            if not taken:
                del self._taken[sender]
        entry = self._settled.get(sender)
        if entry is None or entry.inc != inc:  # a new incarnation starts over
            entry = self._settled[sender] = _Seen(inc)
        self._settled.move_to_end(sender)
        entry.add(seq)
        self._changed[sender] = self._announced
        while len(self._settled) > self.max_senders:
            self._changed.pop(self._settled.popitem(last=False)[0], None)

    def receipt(self, sender: str) -> tuple[int, int] | None:
        """``(inc, seq)``: the child may forget its updates up to ``seq``.

        The end of the unbroken run of settled seqs from the sender's ``low``: a gap
        (an update lost on the way, or still open in a round) stops it, and so does a
        forged huge seq, which no run reaches."""
        entry = self._settled.get(sender)
        if entry is None or entry.last < 0:
            return None
        seq = entry.receipt()
        return (entry.inc, seq) if seq >= 0 else None

    def receipts(self, senders: Any = None) -> dict[str, tuple[int, int]]:
        """``{sender: (inc, last seq settled)}`` for ``senders`` (default: all)."""
        names = self._settled if senders is None else senders
        out = {}
        for s in names:
            r = self.receipt(s)
            if r is not None:
                out[s] = r
        return out

    def announced(self, senders: Any, always: Collection[str] = ()) -> dict[str, tuple[int, int]]:
        """The receipts for the next announcement, which this counts: those of
        ``senders`` that changed, or were asked for again, within the last
        ``RECEIPT_ANNOUNCEMENTS`` announcements, and those of ``always`` (gateways: a
        sync without its receipt would read as refused and be sent as new work)."""
        self._announced += 1
        since = self._announced - RECEIPT_ANNOUNCEMENTS
        return self.receipts(
            [s for s in senders if s in always or self._changed.get(s, since - 1) >= since]
        )

    def last_seqs(self) -> dict[str, int]:
        return {s: e.last for s, e in self._settled.items()}

    # ---------------------------------------------------------- checkpointing
    def to_state(self) -> dict[str, Any]:
        return {s: [e.inc, e.floor, sorted(e.top), e.last, e.low] for s, e in self._settled.items()}

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any] | None,
        last_seq: Mapping[str, int] | None = None,
        max_senders: int = 10_000,
    ) -> Ledger:
        """From a checkpoint; one without a ledger had only each sender's last seq."""
        ledger = cls(max_senders)
        if state:
            for s, (inc, floor, top, last, *low) in state.items():
                seen = _Seen(int(inc), int(floor), set(map(int, top)), int(last))
                seen.low = int(low[0]) if low else 0
                ledger._settled[str(s)] = seen
        else:
            for s, seq in (last_seq or {}).items():
                ledger._settled[str(s)] = _Seen(0, int(seq), set(), int(seq))
        # A restarted node does not know which receipts went out: all of them go again.
        ledger._changed = dict.fromkeys(ledger._settled, 0)
        return ledger
