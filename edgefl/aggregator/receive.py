"""The receive path of an aggregation node: every message, as the transport reads it.

Updates are decoded, checked and measured in a worker thread while the event loop
reads the next ones, then admitted and folded on the loop in arrival order; statuses
update the children, the parent's model is checked and noted. Nothing here awaits,
publishes or touches the disk (the journal's writer thread does that).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from .. import codecs
from ..codecs import Scratch
from ..topics import ID_RE
from ..transport import Message
from ..wire import Announcement, Reason, Rejected, Status, decode_status
from .admission import Inspected, UpdateGate

if TYPE_CHECKING:
    from .node import Aggregator

log = logging.getLogger(__name__)

#: Updates inspected ahead at most; past this the loop waits for the oldest, which
#: bounds the memory held and keeps arrival order.
AHEAD = 16


class Ahead:
    """Updates in arrival order, inspected (``UpdateGate.inspect``: decode, signature,
    content, norm) in one worker thread while the event loop reads the next ones
    (msgspec, hashlib and torch release the GIL), then handed to ``admit`` on the loop
    in that same order. Each update in flight measures into a scratch of its own."""

    def __init__(
        self,
        gate: UpdateGate,
        admit: Callable[[str, bytes, Inspected, float], None],
        name: str,
    ) -> None:
        self._gate = gate
        self.admit = admit
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[tuple[str, bytes, Future[tuple[Inspected, float]]]] = deque()
        # The one for update k is used again by k + AHEAD + 1, admitted after k was.
        self._scratches = [Scratch() for _ in range(AHEAD + 1)]
        self._submitted = 0

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, sender: str, payload: bytes) -> None:
        if self._pool is None:
            self._loop = asyncio.get_running_loop()
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self._name}-inspect")
        scratch = self._scratches[self._submitted % len(self._scratches)]
        self._submitted += 1
        future = self._pool.submit(self._inspect, payload, sender, scratch)
        self._queue.append((sender, payload, future))
        if len(self._queue) > AHEAD:
            self._admit_oldest()
        future.add_done_callback(self._done)

    def ready(self) -> None:
        """Admit, in order, the updates at the head whose inspection is over."""
        while self._queue and self._queue[0][2].done():
            self._admit_oldest()

    def flush(self) -> None:
        """Admit every update in flight, waiting for its inspection (a few ms at most)."""
        while self._queue:
            self._admit_oldest()

    def close(self) -> None:
        """Stop the worker; what it held is dropped (not receipted: children resend it)."""
        self._queue.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _inspect(self, payload: bytes, sender: str, scratch: Scratch) -> tuple[Inspected, float]:
        started = time.perf_counter()
        found = self._gate.inspect(
            payload, sender, lambda ts: math.sqrt(codecs.squared_norm(ts, scratch)), scratch
        )
        return found, time.perf_counter() - started

    def _admit_oldest(self) -> None:
        sender, payload, future = self._queue.popleft()
        found, seconds = future.result()
        self.admit(sender, payload, found, seconds)

    def _done(self, _: Future[tuple[Inspected, float]]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.ready)


class ReceivePath:
    """The node's message callback; ``on_update`` is the hot path (one per update)."""

    def __init__(self, node: Aggregator) -> None:
        self.node = node
        self._update_prefix = node.topics.updates_of(node.id)[:-1]
        self._status_prefix = node.topics.statuses_of(node.id)[:-1]
        self._parent_topics = set(node.topics.downlink(node.parent)) if node.parent else set()
        self._announced = -1  # the parent's highest version announced
        self.ahead = Ahead(node.gate, self.on_update, node.id)

    def dispatch(self, message: Message) -> None:
        topic = message.topic
        if topic.startswith(self._update_prefix):
            self.ahead.submit(topic[len(self._update_prefix) :], message.payload)
        elif topic.startswith(self._status_prefix):
            self.on_status(topic[len(self._status_prefix) :], message.payload)
        elif topic in self._parent_topics:
            self.on_parent(topic, message.payload)

    def on_update(
        self, sender: str, payload: bytes, found: Inspected | None = None, spent: float = 0.0
    ) -> None:
        """Admit and fold one update; ``found``: what ``Ahead`` inspected in it already
        (None: inspect it here), ``spent`` the seconds that took."""
        node = self.node
        started = time.perf_counter() - spent
        rnd, children = node.round, node.children
        try:
            if not ID_RE.match(sender):
                raise Rejected(Reason.UNKNOWN_SENDER, "not an id")
            ok = node.gate.admit(
                payload if found is None else found,
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
