"""An announcement carries only the receipts that changed lately, and a device that
missed its receipt still gets it: it resends, and the node's duplicate brings it back."""

from __future__ import annotations

import sys
from pathlib import Path

from edgefl.aggregator.ledger import RECEIPT_ANNOUNCEMENTS, Ledger
from edgefl.delivery import RESEND_MIN_S, Uploader
from edgefl.outbox import Outbox
from edgefl.wire import Announcement, TrainConfig, encode_announcement

sys.path.insert(0, str(Path(__file__).parent))
from test_uploader import TOPIC, Clock, FakeTransport

CHILDREN = [f"dev-{i:03d}" for i in range(100)]  # a gateway of `simulate large`
INC = 4_000_000_000  # a random incarnation, as large as they come


def _announcement(receipts: dict[str, tuple[int, int]]) -> Announcement:
    return Announcement(
        sender="gw-1", version=42, round=42, selected=CHILDREN[:10], deadline=1.7e9,
        sent_at=1.7e9 - 60, config=TrainConfig(deadline_s=RESEND_MIN_S), receipts=receipts,
    )  # fmt: skip


def test_an_announcement_carries_only_the_receipts_that_changed_lately() -> None:
    ledger = Ledger()
    for child in CHILDREN:  # every child has had updates settled once
        ledger.settle(child, INC, 0)
    everyone = ledger.announced(CHILDREN)
    assert len(everyone) == 100
    for _ in range(RECEIPT_ANNOUNCEMENTS - 1):
        assert len(ledger.announced(CHILDREN)) == 100  # each receipt rides in 3 of them
    sizes = []
    for r in range(5):  # then ten children per round answer, as a round selects them
        for child in CHILDREN[10 * r : 10 * r + 10]:
            ledger.settle(child, INC, 1)
        carried = ledger.announced(CHILDREN)
        assert set(carried) == set(CHILDREN[max(0, 10 * r - 20) : 10 * r + 10])
        assert all(carried[c] == (INC, 1) for c in carried)
        sizes.append(len(encode_announcement(_announcement(carried))))
    whole = len(encode_announcement(_announcement(everyone)))
    print(f"announcement for 100 children: {whole} B with every receipt, {max(sizes)} B now")
    assert whole > 1500 and max(sizes) < 1000


def test_a_gateways_receipt_rides_in_every_announcement() -> None:
    ledger = Ledger()
    for child in ("gw-1", "dev-001"):
        ledger.settle(child, INC, 0)
    for _ in range(RECEIPT_ANNOUNCEMENTS):
        ledger.announced(["gw-1", "dev-001"], always={"gw-1"})
    for _ in range(10):  # a gateway away for rounds still finds its sync receipted
        assert ledger.announced(["gw-1", "dev-001"], always={"gw-1"}) == {"gw-1": (INC, 0)}


def test_a_restarted_node_announces_every_receipt_it_restored_once_more() -> None:
    ledger = Ledger()
    for child in CHILDREN[:5]:
        ledger.settle(child, INC, 0)
    for _ in range(RECEIPT_ANNOUNCEMENTS):
        ledger.announced(CHILDREN)
    assert ledger.announced(CHILDREN) == {}
    again = Ledger.from_state(ledger.to_state())
    for _ in range(RECEIPT_ANNOUNCEMENTS):
        assert again.announced(CHILDREN) == {c: (INC, 0) for c in CHILDREN[:5]}
    assert again.announced(CHILDREN) == {}


async def test_a_device_that_missed_its_receipt_resends_and_the_next_announcement_has_it(
    tmp_path: Path,
) -> None:
    clock = Clock()
    box = Outbox(tmp_path / "outbox.db", clock=clock)
    box.put_with_seq("dev-001", TOPIC, lambda seq: b"update-%d" % seq)
    transport, uploader, ledger = FakeTransport(), Uploader(), Ledger()
    await uploader.flush(box, transport)  # type: ignore[arg-type]
    ledger.settle("dev-001", box.incarnation, 0)  # the node folded it into a saved round
    for _ in range(RECEIPT_ANNOUNCEMENTS):
        ledger.announced(CHILDREN)  # the device was away for every one of these
    late = _announcement(ledger.announced(CHILDREN))
    assert "dev-001" not in late.receipts
    uploader.note(late, "dev-001")
    await uploader.flush(box, transport)  # type: ignore[arg-type]
    assert box.backlog().unreceipted == 1  # nothing drained: it still waits
    clock.now += RESEND_MIN_S  # no receipt within a round: the device sends it again
    await uploader.flush(box, transport)  # type: ignore[arg-type]
    assert transport.published == [b"update-0", b"update-0"]
    assert ledger.seen("dev-001", box.incarnation, 0)  # the node's duplicate check
    uploader.note(_announcement(ledger.announced(CHILDREN)), "dev-001")
    await uploader.flush(box, transport)  # type: ignore[arg-type]
    assert (len(box), box.backlog().unreceipted, uploader.settled) == (0, 0, 1)
