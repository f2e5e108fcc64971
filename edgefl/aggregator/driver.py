"""The round driver of an aggregation node: announce, close, re-announce, adopt the parent's.

One task per node runs ``drive``: it sleeps until something is due (a deadline, a
quorum the receive path saw, a parent model, a heartbeat), does it and sleeps
again. Averaging runs in a worker thread; the checkpoint lands before a new
version is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING

from ..params import Params, is_finite
from ..signing import sign_model
from ..supervise import wait_event
from ..tasks import set_torch_threads
from ..transport import LOST
from ..wire import Announcement, MetricValue, Reason, Rejected, encode_announcement
from .fold import FoldStats
from .parent import PendingSync
from .records import round_story
from .rounds import CloseReason, Round, apply_delta
from .selection import select

if TYPE_CHECKING:
    from .node import Aggregator

log = logging.getLogger(__name__)

#: After connecting, how long to let retained statuses and the parent model arrive
#: before the first round is announced.
STARTUP_GRACE_S = 0.5


class Driver:
    """Opens, closes and re-announces a node's rounds; ``drive`` is one of its tasks."""

    def __init__(self, node: Aggregator) -> None:
        self.node = node
        self.last_opened = -math.inf  # when the latest round opened, on the node's clock

    @property
    def opens_at(self) -> float:
        """The earliest time the next round may open: ``min_round_interval_s`` pacing."""
        return self.last_opened + self.node.settings.min_round_interval_s

    async def drive(self) -> None:
        node = self.node
        await node.transport.wait_connected()
        await asyncio.sleep(STARTUP_GRACE_S)
        await node._heartbeat()
        if not await self.adopt_parent():
            await self.announce()
        for (sender, _, _), payload in node._replay_later:  # now the round is announced
            node.receive.on_update(sender, payload)
        node._replay_later = []
        while not (node.settings.rounds and node.aggregations >= node.settings.rounds):
            await self.step()
        if node.link is not None:  # the last sync should reach the parent before we stop
            await wait_event(node.link.idle, node.settings.mqtt.publish_timeout_s)

    async def step(self) -> None:
        """One pass of the driver: whatever is due now, then sleep until something is."""
        node = self.node
        node._wake.clear()
        # First: the branches below return as soon as they open or close a round, and a
        # busy node's steps all do; its parent must know it before its sync arrives.
        if node._status_due or node.clock() >= node._heartbeat_at:
            await node._heartbeat()
        await self.fetch()
        now = node.clock()
        rnd = node.round
        if await self.adopt_parent():
            return
        if rnd.announced:
            reason = rnd.ready(now, node.children.online_eligible, node.children.online)
            if reason is not None:
                await self.close(reason)
                return
            if rnd.expired(now) and now >= self.opens_at:
                await self.announce(again=True)
                return
            if node._announce_due:
                await self.publish_model()
        elif now >= max(node._wait_until, self.opens_at):
            await self.announce()
            return
        due = node.round.deadline if rnd.announced else node._wait_until
        wake_at = min(max(due, self.opens_at), node._heartbeat_at)
        await wait_event(node._wake, max(0.0, wake_at - node.clock()) + 0.01)

    async def fetch(self) -> None:
        """Subscribe to what the parent's latest version needs (delta, or whole model)."""
        feed, transport = self.node.feed, self.node.transport
        if feed is not None and transport.connected:
            with contextlib.suppress(*LOST):
                await feed.refresh(transport, feed.seen)

    async def announce(self, *, again: bool = False) -> None:
        """Open the current round, or, after a deadline with no update, a new one.

        A re-announcement is a new round number on the same version: a child that
        trained the old one (and whose update was lost) trains again, so no loss and
        no restart can leave every child waiting for a round it already did.
        """
        node = self.node
        s = node.settings
        if node.clock() < self.opens_at:
            return  # paced: the driver's step opens it at opens_at
        if again:
            old = node.round
            node.children.round_closed(
                old.pool(node.children.online_eligible, node.children.online), old.senders
            )
            node.round = node._next_round(old.number + 1)
            node.round.opened_at, node.round.reannounced = old.opened_at, old.reannounced
            node.round.waiting = old.waiting
        rnd, now = node.round, node.clock()
        chosen = select(
            node.children.selectable,
            node.last_selected,
            s.per_round,
            seed=s.seed,
            round=rnd.number,
        )
        for child in chosen:
            node.last_selected[child] = rnd.number
        rnd.selected = chosen
        rnd.version = node.version
        rnd.deadline = now + s.train.deadline_s
        self.last_opened = now
        if not again:
            rnd.opened_at = now
        rnd.reannounced += again
        rnd.announced = True
        for ok, why in rnd.open_waiting(lambda ok: node.gate.weight(ok, node.version)):
            sender, inc, seq = ok.update.sender, ok.update.inc, ok.update.seq
            # The rule admission applies to a stale update: settled for a device only; a
            # gateway's stale sync must not pass for folded.
            if node.children.is_device(sender):
                node.gate.ledger.settle(sender, inc, seq)
            log.debug("%s: refused %s:%d:%d (stale)", node.id, sender, inc, seq)
            node.rejected.add(sender, Rejected(Reason.STALE, why))
        await self.publish_model()
        if again:
            log.info(
                "%s round %d: no update by the deadline; re-announced (v%d, %d selected)",
                node.id,
                rnd.number,
                node.version,
                len(chosen),
            )
            await node._metrics({"event": "reannounce", **node._round_fields(rnd)})

    async def publish_model(self) -> None:
        """Publish the round: a new version first (delta and whole model, retained), then
        the announcement every child reads. What did not go out goes at the next try."""
        node = self.node
        rnd, s = node.round, node.settings
        try:
            if node.downlink.version != node.version:
                await node.downlink.publish_version(node.params, node.version, node._model_key)
            announcement = Announcement(
                sender=node.id,
                version=node.version,
                base=node.downlink.base,
                round=rnd.number,
                config=s.train,
                selected=list(rnd.selected),
                deadline=rnd.deadline,
                sent_at=node.clock(),
                receipts=node.gate.ledger.announced(
                    node.children.known,
                    {c for c in node.children.known if not node.children.is_device(c)},
                ),
            )
            if node._model_key is not None:
                announcement = sign_model(announcement, node._model_key)
            await node.downlink.announce(encode_announcement(announcement))
            node._announce_due = False
        except LOST as exc:
            node._announce_due = True
            log.debug("%s: round %d not announced yet: %s", node.id, rnd.number, exc)

    async def close(self, reason: CloseReason) -> None:
        """Average, apply, checkpoint, sync, announce the next round, then report.

        The next round takes new updates while this one is averaged off the loop. The
        checkpoint lands before the new version is published, so children never see
        a version the node could forget in a crash, and receipts name only saved work.
        """
        node = self.node
        rnd, s, link = node.round, node.settings, node.link
        node.children.round_closed(
            rnd.pool(node.children.online_eligible, node.children.online)
            if reason == "deadline"
            else (),
            rnd.senders,
        )
        node.round = node._next_round(rnd.number + 1)
        node.round.waiting = rnd.carry
        started = time.perf_counter()
        delta, stats = await asyncio.to_thread(self.average, rnd)
        params = apply_delta(node.params, delta)
        if is_finite(params):
            node.params = params
        else:  # cannot happen with clipping; never publish or save such a model
            log.error("%s round %d: the average is not finite; model kept", node.id, rnd.number)
            node.rejected.counts[Reason.NONFINITE] += rnd.participants
        agg_ms = (time.perf_counter() - started) * 1e3
        closed_at = node.clock()
        node.version += 1
        node.round.version = node.version
        node.aggregations += 1
        for sender, inc, seq in rnd.taken:
            node.gate.ledger.settle(sender, inc, seq)
        if log.isEnabledFor(logging.DEBUG):  # every update accounted for, by (sender, inc, seq)
            folded = " ".join(f"{s}:{i}:{q}" for s, i, q in rnd.taken)
            log.debug("%s round %d folded %s", node.id, rnd.number, folded)
        rnd.samples = stats.samples  # what the sync tells the parent: the capped total
        sync: PendingSync | None = None
        if link is not None:
            link.sync.after_round(stats.samples)
            if link.sync.due(s.sync_every):  # never while a sync waits for its receipt
                sync = await link.build(node.params, rnd.number)
        await node._checkpoint()
        if link is not None and sync is not None:
            await link.store(sync)
            # Wait a little for the parent's next version, so the next local round starts
            # from it; a slow or unreachable parent costs at most one local deadline.
            node._wait_until = node.clock() + s.train.deadline_s
        else:
            await self.announce()
        evaluation = await node._evaluate()
        fields: dict[str, MetricValue] = {
            "event": "round",
            **node._round_fields(rnd),
            "version": node.version,
            "close": reason,
            "agg_ms": round(agg_ms, 3),
            "round_ms": round((closed_at - rnd.opened_at) * 1e3, 1),
            "synced": sync is not None,
            "sync_seq": sync["seq"] if sync else None,
            "clipped": stats.clipped,
            "clip_bound": stats.clip_bound if math.isfinite(stats.clip_bound) else None,
            "weight_share_max": round(stats.weight_share_max, 6),
            **evaluation,
        }
        await node._metrics(fields)
        log.info("%s", round_story(node.id, rnd, fields, node.version))

    def average(self, rnd: Round) -> tuple[Params, FoldStats]:
        """In a worker thread: the round's fold, under this node's torch thread limit."""
        node = self.node
        set_torch_threads(node.settings.torch_threads)
        return rnd.average()

    async def adopt_parent(self) -> bool:
        """Take the parent's newer model, if one arrived; True if a round was (re)opened."""
        node = self.node
        pending, node._parent_model = node._parent_model, None
        link = node.link
        if pending is None or link is None or pending[0] == link.sync.parent_version:
            return False
        previous = link.sync.parent_version
        params = link.sync.adopt(pending[1], node.params, pending[0])
        if not is_finite(params):  # the parent's model was checked: our own work is not
            log.error(
                "%s: adopting %s v%d is not finite; skipped", node.id, node.parent, pending[0]
            )
            return False
        node.params = params
        node.version += 1
        log.info(
            "%s: adopted %s v%d (had v%d): now v%d",
            node.id,
            node.parent,
            pending[0],
            previous,
            node.version,
        )
        # A round with deltas folded keeps going: they land on the adopted model at its
        # close. Otherwise the next local round starts from the adopted model now.
        restart = not (node.round.announced and node.round.participants)
        if restart and node.round.announced:
            node.round = node._next_round(node.round.number + 1)
        await node._checkpoint()
        if restart:
            await self.announce()
        return restart
