"""The aggregation node (gateway or cloud): an asyncio shell over rounds, admission and sync.

The receive path decodes, checks and folds each update as the transport reads it
(nothing else happens there); one driver task opens, closes and re-announces
rounds, checkpoints and publishes; the parent link delivers sync updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointStore, NodeState
from ..config import AggregatorSettings, ConfigError
from ..outbox import Outbox
from ..params import Params, is_finite, num_parameters
from ..profiles import OsReader
from ..robust import NormWindow
from ..signing import load_private_key, load_public_key, sign_model
from ..supervise import first_completed, wait_event
from ..tasks import Task, load_task, set_torch_threads
from ..telemetry import Telemetry, last_will
from ..topics import Topics
from ..transport import NotConnected, PublishTimeout, Transport
from ..wire import (
    MetricValue,
    Model,
    Reason,
    Status,
    UpdateRejected,
    encode_model,
    model_tensors,
)
from .admission import Rejections, UpdateGate
from .fold import FoldStats, RoundFold
from .journal import Journal, Key, replay
from .parent import ParentLink, PendingSync
from .persist import resume, snapshot, unsettled
from .receive import ReceivePath
from .report import evaluation_fields, round_fields, round_story
from .retained import RetainedModel
from .rounds import CloseReason, Round, apply_delta
from .selection import Children, select
from .uplink import Uplink

log = logging.getLogger("edgefl.aggregator")

#: After connecting, how long to let retained statuses and the parent model arrive
#: before the first round is announced.
STARTUP_GRACE_S = 0.5
GOODBYE_TIMEOUT_S = 2.0
_LOST = (NotConnected, PublishTimeout)


class Aggregator:
    """``async with Aggregator(settings) as node: await node.run()`` for a gateway or the cloud.

    ``task`` defaults to ``load_task(settings.task, **settings.task_options)``;
    every tier must use the same task and seed, since version 0 of every node is
    ``task.init_params(settings.seed)``. ``clock`` gives wall-clock seconds
    (deadlines travel in Models as unix times). ``reader`` (anything with
    ``read() -> profiles.Reading``, default ``profiles.OsReader``) fills the
    battery, link and uplink of a gateway's Status.
    """

    def __init__(
        self,
        settings: AggregatorSettings,
        task: Task | None = None,
        *,
        clock: Callable[[], float] = time.time,
        reader: Any = None,
    ) -> None:
        if settings.tier == "cloud" and settings.parent is not None:
            raise ConfigError("the cloud tier has no parent; use tier 'gateway' for a middle tier")
        self.settings = settings
        self.id = settings.id
        self.tier = settings.tier
        self.parent = (settings.parent or "cloud") if settings.tier == "gateway" else None
        self.clock = clock
        # A gateway tells its parent its power and link like any child would.
        self.reader = reader if reader is not None else OsReader()
        self.topics = Topics(settings.mqtt.prefix)
        try:
            self.task = task or load_task(settings.task, **settings.task_options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
        self.spec = self.task.spec()
        self.params: Params = self.task.init_params(settings.seed)
        self.version = 0
        self.aggregations = 0
        self.last_selected: dict[str, int] = {}
        nparams = num_parameters(self.params)
        self.gate = UpdateGate.from_settings(settings, self.spec)
        self.children = Children.from_settings(settings, nparams, self.gate.credentialed)
        self.rejected = Rejections(self.id)
        self.norms = NormWindow()  # recently accepted update norms: the clip bound
        self.round = self._next_round(0)
        self.state_dir = Path(settings.state_dir) / self.id
        self.store: CheckpointStore | None = None
        self._payload_limit = max(settings.max_update_bytes, 4 * nparams + (1 << 20))
        self.transport = Transport(
            settings.mqtt,
            f"edgefl-{self.tier}-{self.id}",
            will=last_will(self.topics, self.parent, self.id, self.tier) if self.parent else None,
            on_connect=self._on_connect,
            on_message=lambda m: self.receive.dispatch(m),  # runs as each message is read
            max_payload_bytes=self._payload_limit,
            # Updates sent while the node restarts wait at the broker, not in the void.
            persistent=True,
        )
        self.link: ParentLink | None = None
        if self.parent is not None:
            self.link = ParentLink(
                node=self.id,
                parent=self.parent,
                topics=self.topics,
                transport=self.transport,
                uplink=Uplink(dict(self.params), 0, max_staleness=settings.max_staleness),
                hmac_key=bytes.fromhex(settings.hmac_key) if settings.hmac_key else None,
                dtype=settings.update_dtype,
                retry_s=settings.mqtt.reconnect_min_s,
            )
        self.telemetry = Telemetry(
            self.transport,
            self.topics,
            role=self.tier,
            sender=self.id,
            parent=self.parent,
            metrics=settings.metrics,
        )
        self.last_metrics: dict[str, MetricValue] = {}
        self.receive = ReceivePath(self)
        self._parent_model: tuple[int, Params] | None = None
        self._model_key = load_private_key(settings.model_key) if settings.model_key else None
        self._parent_key = load_public_key(settings.parent_key) if settings.parent_key else None
        if self.parent is not None and self._parent_key is None:
            log.warning(
                "%s: no parent_key: unsigned models from %s are adopted", self.id, self.parent
            )
        self.journal: Journal | None = None
        self._replay_later: list[tuple[Key, bytes]] = []
        self.retained = RetainedModel(
            self.transport, self.topics.model(self.id), settings.mqtt.max_message_bytes
        )
        self._wake = asyncio.Event()
        self._announce_due = False
        self._status_due = True
        self._wait_until = 0.0
        self._heartbeat_at = 0.0

    @property
    def uplink(self) -> Uplink | None:
        """The sync state with the parent (None for the cloud)."""
        return self.link.uplink if self.link is not None else None

    @property
    def outbox(self) -> Outbox | None:
        """Sync updates not yet acknowledged by the broker (None for the cloud)."""
        return self.link.outbox if self.link is not None else None

    # --------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Aggregator:
        s = self.settings
        if s.checkpoint:
            self.store = CheckpointStore(self.state_dir)
            if self._restore(self.store.load(), self.retained.restore(self.store).version):
                # Saved at once, so that a second restart announces yet another round.
                await self._checkpoint()
            self.journal = await asyncio.to_thread(Journal, self.state_dir / "journal.log")
            # What the open round held when the node stopped, admitted again before
            # anything from the broker; a sender's second update waits for the announcement.
            self.children.remember(key[0] for key, _ in self.journal.entries())
            self._replay_later = replay(
                self.journal, self.receive.on_update, self.round.waiting.__contains__
            )
            self.journal.start()
        if self.link is not None:
            self.link.open(self.state_dir / "uplink.sqlite")
        for topic in (self.topics.updates_of(self.id), self.topics.statuses_of(self.id)):
            await self.transport.subscribe(topic)
        if self.parent is not None:
            for topic in self.topics.model_filters(self.parent):
                await self.transport.subscribe(topic)
        await self.transport.__aenter__()
        log.info(
            "%s %s: task %s (%d parameters), version %d, round %d, parent %s, broker %s",
            self.tier,
            self.id,
            self.task.name,
            num_parameters(self.params),
            self.version,
            self.round.number,
            self.parent or "none",
            s.mqtt.broker,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.transport.connected:
                with contextlib.suppress(*_LOST, asyncio.TimeoutError):
                    await asyncio.wait_for(self.telemetry.offline(), GOODBYE_TIMEOUT_S)
        finally:
            await self.transport.close()
            if self.link is not None:
                self.link.close()
            if self.journal is not None:  # its entries stay: the next start replays them
                await asyncio.to_thread(self.journal.close)

    async def run(self) -> None:
        """Serve rounds until ``settings.rounds`` aggregations are done (0: until cancelled)."""
        workers = [self._drive()]
        if self.link is not None:
            workers.append(self.link.flush())
        await first_completed(*workers)

    async def _on_connect(self) -> None:
        self._status_due = True
        self._announce_due = self.round.announced
        if self.link is not None:
            self.link.wake()
        self._wake.set()

    # ------------------------------------------------------------------ rounds
    async def _drive(self) -> None:
        await self.transport.wait_connected()
        await asyncio.sleep(STARTUP_GRACE_S)
        if not await self._adopt_parent():
            await self._announce()
        for (sender, _, _), payload in self._replay_later:  # now the round is announced
            self.receive.on_update(sender, payload)
        self._replay_later = []
        while not (self.settings.rounds and self.aggregations >= self.settings.rounds):
            await self._step()
        if self.link is not None:  # the last sync should reach the parent before we stop
            await wait_event(self.link.idle, self.settings.mqtt.publish_timeout_s)

    async def _step(self) -> None:
        """One pass of the driver: whatever is due now, then sleep until something is."""
        self._wake.clear()
        now = self.clock()
        rnd = self.round
        if await self._adopt_parent():
            return
        if rnd.announced:
            reason = rnd.ready(now, self.children.online_eligible, self.children.online)
            if reason is not None:
                await self._close(reason)
                return
            if rnd.expired(now):
                await self._announce(again=True)
                return
            if self._announce_due:
                await self._publish_model()
        elif now >= self._wait_until:
            await self._announce()
            return
        if self._status_due or now >= self._heartbeat_at:
            await self._heartbeat()
        wake_at = min(
            self.round.deadline if rnd.announced else self._wait_until, self._heartbeat_at
        )
        await wait_event(self._wake, max(0.0, wake_at - self.clock()) + 0.01)

    def _next_round(self, number: int) -> Round:
        s = self.settings
        fold = RoundFold.from_settings(s, self.norms)
        return Round(number, self.version, fold, s.min_updates, s.quorum)

    async def _announce(self, *, again: bool = False) -> None:
        """Open the current round, or, after a deadline with no update, a new one.

        A re-announcement is a new round number on the same version: a child that
        trained the old one (and whose update was lost) trains again, so no loss and
        no restart can leave every child waiting for a round it already did.
        """
        s = self.settings
        if again:
            old = self.round
            self.children.round_closed(
                old.pool(self.children.online_eligible, self.children.online), old.senders
            )
            self.round = self._next_round(old.number + 1)
            self.round.opened_at, self.round.reannounced = old.opened_at, old.reannounced
            self.round.waiting = old.waiting
        rnd, now = self.round, self.clock()
        chosen = select(
            self.children.selectable,
            self.last_selected,
            s.per_round,
            seed=s.seed,
            round=rnd.number,
        )
        for child in chosen:
            self.last_selected[child] = rnd.number
        rnd.selected = chosen
        rnd.version = self.version
        rnd.deadline = now + s.train.deadline_s
        if not again:
            rnd.opened_at = now
        rnd.reannounced += again
        rnd.announced = True
        for ok, why in rnd.open_waiting(lambda ok: self.gate.weight(ok, rnd.version)):
            self.gate.ledger.settle(ok.update.sender, ok.update.inc, ok.update.seq)
            self.rejected.add(ok.update.sender, UpdateRejected(Reason.STALE, why))
        await self._publish_model()
        if again:
            log.info(
                "%s round %d: no update by the deadline; re-announced (v%d, %d selected)",
                self.id,
                rnd.number,
                self.version,
                len(chosen),
            )
            await self._metrics({"event": "reannounce", **self._round_fields(rnd)})

    async def _publish_model(self) -> None:
        rnd, s = self.round, self.settings
        model = Model(
            sender=self.id,
            version=self.version,
            round=rnd.number,
            tensors=model_tensors(self.params, s.downlink_dtype),
            config=s.train,
            selected=list(rnd.selected),
            deadline=rnd.deadline,
            sent_at=self.clock(),
            receipts=self.gate.ledger.receipts(self.children.known),
        )
        if self._model_key is not None:
            model = sign_model(model, self._model_key)
        try:
            await self.retained.publish(encode_model(model), self.version)
            self._announce_due = False
        except _LOST as exc:
            self._announce_due = True
            log.debug("%s: model v%d not published yet: %s", self.id, self.version, exc)

    async def _close(self, reason: CloseReason) -> None:
        """Average, apply, checkpoint, sync, announce the next round, then report.

        The next round takes new updates while this one is averaged off the loop. The
        checkpoint lands before the new version is published, so children never see
        a version the node could forget in a crash, and receipts name only saved work.
        """
        rnd, s, link = self.round, self.settings, self.link
        self.children.round_closed(
            rnd.pool(self.children.online_eligible, self.children.online)
            if reason == "deadline"
            else (),
            rnd.senders,
        )
        self.round = self._next_round(rnd.number + 1)
        self.round.waiting = rnd.carry
        started = time.perf_counter()
        delta, stats = await asyncio.to_thread(self._average, rnd)
        params = apply_delta(self.params, delta)
        if is_finite(params):
            self.params = params
        else:  # cannot happen with clipping; never publish or save such a model
            log.error("%s round %d: the average is not finite; model kept", self.id, rnd.number)
            self.rejected.counts[Reason.NONFINITE] += rnd.participants
        agg_ms = (time.perf_counter() - started) * 1e3
        closed_at = self.clock()
        self.version += 1
        self.round.version = self.version
        self.aggregations += 1
        for sender, inc, seq in rnd.taken:
            self.gate.ledger.settle(sender, inc, seq)
        if log.isEnabledFor(logging.DEBUG):  # every update accounted for, by (sender, inc, seq)
            folded = " ".join(f"{s}:{i}:{q}" for s, i, q in rnd.taken)
            log.debug("%s round %d folded %s", self.id, rnd.number, folded)
        rnd.samples = stats.samples  # what the sync tells the parent: the capped total
        sync: PendingSync | None = None
        if link is not None:
            link.uplink.after_round(stats.samples)
            if link.uplink.due(s.sync_every):  # never while a sync waits for its receipt
                sync = await link.build(self.params, rnd.number)
        await self._checkpoint()
        if link is not None and sync is not None:
            await link.store(sync)
            # Wait a little for the parent's next version, so the next local round starts
            # from it; a slow or unreachable parent costs at most one local deadline.
            self._wait_until = self.clock() + s.train.deadline_s
        else:
            await self._announce()
        evaluation = await self._evaluate()
        fields: dict[str, MetricValue] = {
            "event": "round",
            **self._round_fields(rnd),
            "version": self.version,
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
        await self._metrics(fields)
        log.info("%s", round_story(self.id, rnd, fields, self.version))

    def _average(self, rnd: Round) -> tuple[Params, FoldStats]:
        """In a worker thread: the round's fold, under this node's torch thread limit."""
        set_torch_threads(self.settings.torch_threads)
        return rnd.average()

    async def _adopt_parent(self) -> bool:
        """Take the parent's newer model, if one arrived; True if a round was (re)opened."""
        pending, self._parent_model = self._parent_model, None
        link = self.link
        if pending is None or link is None or pending[0] == link.uplink.parent_version:
            return False
        previous = link.uplink.parent_version
        params = link.uplink.adopt(pending[1], self.params, pending[0])
        if not is_finite(params):  # the parent's model was checked: our own work is not
            log.error(
                "%s: adopting %s v%d is not finite; skipped", self.id, self.parent, pending[0]
            )
            return False
        self.params = params
        self.version += 1
        log.info(
            "%s: adopted %s v%d (had v%d): now v%d",
            self.id,
            self.parent,
            pending[0],
            previous,
            self.version,
        )
        # A round with deltas folded keeps going: they land on the adopted model at its
        # close. Otherwise the next local round starts from the adopted model now.
        restart = not (self.round.announced and self.round.participants)
        if restart and self.round.announced:
            self.round = self._next_round(self.round.number + 1)
        await self._checkpoint()
        if restart:
            await self._announce()
        return restart

    # --------------------------------------------------------- state and sync
    def _restore(self, state: NodeState | None, published: int = -1) -> bool:
        number = resume(self, state, published)
        if number is not None:
            self.round = self._next_round(number)
        return number is not None

    async def _checkpoint(self) -> None:
        """Save the model and what is settled (never the open round's updates); then the
        journal forgets every update but those still unsettled."""
        if self.store is not None:
            await asyncio.to_thread(self.store.save, snapshot(self))
        if self.store is not None and self.journal is not None:
            self.journal.retain(unsettled(self.round, (k for k, _ in self._replay_later)))

    # --------------------------------------------------------------- reporting
    @property
    def _parent_version(self) -> int | None:
        return self.link.uplink.parent_version if self.link is not None else None

    async def _evaluate(self) -> dict[str, MetricValue]:
        s = self.settings
        if not (s.evaluate if s.evaluate is not None else self.tier == "cloud"):
            return {}
        started = time.perf_counter()
        result = await asyncio.to_thread(self.task.evaluate, self.params)
        return evaluation_fields(result, (time.perf_counter() - started) * 1e3)

    def _round_fields(self, rnd: Round) -> dict[str, MetricValue]:
        return round_fields(
            rnd,
            aggregations=self.aggregations,
            children=self.children,
            rejected=self.rejected.counts + self.transport.rejected,
            parent_version=self._parent_version,
            redelivered=self.rejected.redelivered,
        )

    async def _metrics(self, fields: dict[str, MetricValue]) -> None:
        self.last_metrics = fields
        await self.telemetry.metrics(fields)

    async def _heartbeat(self) -> None:
        self._heartbeat_at = self.clock() + self.settings.heartbeat_s
        self.rejected.summarize()
        if self.parent is None:
            self._status_due = False
            return
        reading = self.reader.read()
        status = Status(
            online=True,
            role=self.tier,
            id=self.id,
            battery=reading.battery,
            charging=reading.charging,
            link=reading.link,
            uplink_kbps=reading.uplink_kbps,
            buffered=self.link.buffered if self.link is not None else 0,
            model_version=self.version,
        )
        self._status_due = not await self.telemetry.status(status)


async def serve_aggregator(settings: AggregatorSettings) -> None:
    """The ``edgefl gateway`` / ``edgefl cloud`` command: serve until cancelled or done."""
    set_torch_threads(settings.torch_threads)
    async with Aggregator(settings) as node:
        await node.run()
