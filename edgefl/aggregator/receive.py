"""The receive path of an aggregation node: every message, as the transport reads it.

Updates are decoded, checked and folded into the open round, statuses update the
children, the parent's model is checked and noted; nothing here awaits, publishes
or touches the disk (the journal's writer thread does that).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..topics import ID_RE
from ..transport import Message
from ..wire import Announcement, Reason, Rejected, Status, decode_status

if TYPE_CHECKING:
    from .node import Aggregator

log = logging.getLogger(__name__)


class ReceivePath:
    """The node's message callback; ``on_update`` is the hot path (one per update)."""

    def __init__(self, node: Aggregator) -> None:
        self.node = node
        self._update_prefix = node.topics.updates_of(node.id)[:-1]
        self._status_prefix = node.topics.statuses_of(node.id)[:-1]
        self._parent_topics = set(node.topics.downlink(node.parent)) if node.parent else set()
        self._announced = -1  # the parent's highest version announced

    def dispatch(self, message: Message) -> None:
        topic = message.topic
        if topic.startswith(self._update_prefix):
            self.on_update(topic[len(self._update_prefix) :], message.payload)
        elif topic.startswith(self._status_prefix):
            self.on_status(topic[len(self._status_prefix) :], message.payload)
        elif topic in self._parent_topics:
            self.on_parent(topic, message.payload)

    def on_update(self, sender: str, payload: bytes) -> None:
        node = self.node
        started = time.perf_counter()
        rnd, children = node.round, node.children
        try:
            if not ID_RE.match(sender):
                raise Rejected(Reason.UNKNOWN_SENDER, "not an id")
            ok = node.gate.admit(
                payload,
                sender,
                node.version,
                children.__contains__,
                bound=children.bound,
                measure=rnd.fold.measure,
                absurd=rnd.fold.reject_bound(),
                settles_stale=children.is_device,
            )
        except Rejected as exc:
            node.rejected.add(sender, exc, known=sender in children)
            if node.gate.refused is not None:
                log.debug(
                    "%s: refused %s:%d:%d (%s)", node.id, *node.gate.refused, exc.reason.value
                )
                node.gate.refused = None
            return
        update = ok.update
        # Weighed against the node's version, which admission checked: after an adoption
        # mid-round it is ahead of the round's, and so are the children's bases.
        refused = rnd.admit(sender, ok, node.gate.weight(ok, node.version))
        if refused is not None:  # one update per sender per round, one more carried
            node.gate.ledger.settle(sender, refused.update.inc, refused.update.seq)
            log.debug(
                "%s: refused %s:%d:%d (repeat)",
                node.id,
                sender,
                refused.update.inc,
                refused.update.seq,
            )
            node.rejected.add(sender, Rejected(Reason.REPEAT, "a third in one round"))
            if refused is ok:
                return
        if node.journal is not None:
            node.journal.append((sender, update.inc, update.seq), payload)
        children.answered(sender)
        rnd.bytes_in += len(payload)
        rnd.fold_s += time.perf_counter() - started
        if rnd.may_close(children.online_eligible, children.online):
            node._wake.set()

    def on_status(self, child: str, payload: bytes) -> None:
        node = self.node
        if not ID_RE.match(child):
            return
        status: Status | None = None
        if payload:
            try:
                status = decode_status(payload)
            except Rejected as exc:
                log.debug("%s: bad status from %s: %s", node.id, child, exc)
                return
            if status.id and status.id != child:
                log.debug("%s: status on %s names %s; ignored", node.id, child, status.id)
                return
        if not node.children.update(child, status):
            return
        if status is not None and status.declined == node.round.number:
            node.round.declined.add(child)  # it said so: stop waiting for it this round
        if node.round.announced:
            node._wake.set()

    def on_parent(self, topic: str, payload: bytes) -> None:
        """The parent's announcement (receipts for our sync) or a new version of its model."""
        node, feed, link = self.node, self.node.feed, self.node.link
        if feed is None or link is None:
            return
        got = feed.on_message(topic, payload)
        if isinstance(got, Announcement):
            link.on_model(got)  # its receipts first: adopting rebases on what they settle
            self._announced = max(self._announced, got.version)
            if feed.need(got.version) != "none":
                node._wake.set()  # the driver fetches what it lacks
        elif not got:
            return
        # Adopted once the version is held and its announcement read (the receipts).
        if feed.held is None or feed.version is None or feed.version > self._announced:
            return
        # The version adopted comes back on every reconnect (retained): nothing to do.
        adopted = link.sync.parent_version
        pending = node._parent_model[0] if node._parent_model else adopted
        if feed.version > max(adopted, pending):
            node._parent_model = (feed.version, dict(feed.held))
            node._wake.set()
