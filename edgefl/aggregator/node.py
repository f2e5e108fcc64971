"""The aggregation node (gateway or cloud): an asyncio shell over rounds, admission and sync.

The receive path decodes, checks and folds each update as the transport reads it
(nothing else happens there); one driver task opens, closes and re-announces
rounds, checkpoints and publishes; the parent link delivers sync updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointStore, NodeState
from ..config import AggregatorSettings, ConfigError
from ..downlink import Shared
from ..fetch import ModelFeed
from ..outbox import Outbox
from ..params import Params, num_parameters
from ..profiles import OsReader
from ..robust import NormWindow
from ..signing import load_private_key, load_public_key, warn_unsigned
from ..supervise import bounded, first_completed
from ..tasks import Task, load_task, set_torch_threads
from ..telemetry import ByteMeter, Telemetry, last_will
from ..topics import Topics
from ..transport import LOST, Transport, TransportFactory
from ..wire import (
    MetricValue,
    Status,
)
from .admission import Rejections, UpdateGate
from .driver import Driver
from .fold import RoundFold
from .journal import Journal, Key, replay
from .parent import ParentLink
from .persist import resume, snapshot, unsettled
from .receive import ReceivePath
from .records import evaluation_fields, round_fields
from .retained import Downlink
from .rounds import Round
from .selection import Children
from .sync import ParentSync

log = logging.getLogger(__name__)

GOODBYE_TIMEOUT_S = 2.0


class Aggregator:
    """``async with Aggregator(settings) as node: await node.run()`` for a gateway or the cloud.

    ``task`` defaults to ``load_task(settings.task, **settings.task_options)``;
    every tier must use the same task and seed, since version 0 of every node is
    ``task.init_params(settings.seed)``. ``clock`` gives wall-clock seconds
    (deadlines travel in Models as unix times). ``reader`` (anything with
    ``read() -> profiles.Reading``, default ``profiles.OsReader``) fills the
    battery, link and uplink of a gateway's Status. ``transport`` is a
    ``TransportFactory`` (default: MQTT on ``settings.mqtt``;
    ``MemoryBroker().factory()`` for the in-memory bus).
    """

    def __init__(
        self,
        settings: AggregatorSettings,
        task: Task | None = None,
        *,
        clock: Callable[[], float] = time.time,
        reader: Any = None,
        transport: TransportFactory | None = None,
    ) -> None:
        if settings.role == "cloud" and settings.parent is not None:
            raise ConfigError("the cloud has no parent; use role 'gateway' for a middle tier")
        self.settings = settings
        self.id = settings.id
        self.role = settings.role
        self.parent = (settings.parent or "cloud") if settings.role == "gateway" else None
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
        self.children = Children.from_settings(settings, self.spec, self.gate.credentialed)
        self.rejected = Rejections(self.id)
        self.norms = NormWindow()  # recently accepted update norms: the clip bound
        self.round = self._next_round(0)
        self.state_dir = Path(settings.state_dir) / self.id
        self.store: CheckpointStore | None = None
        self._payload_limit = max(settings.max_update_bytes, 4 * nparams + (1 << 20))
        self.receive = ReceivePath(self)
        make = transport or functools.partial(Transport, settings.mqtt)
        self.transport = make(
            f"edgefl-{self.role}-{self.id}",
            will=last_will(self.topics, self.parent, self.id, self.role) if self.parent else None,
            on_connect=self._on_connect,
            on_message=self.receive.dispatch,  # the receive path runs as each message is read
            max_payload_bytes=self._payload_limit,
            # Updates sent while the node restarts wait at the broker, not in the void.
            persistent=True,
        )
        self.meter = ByteMeter(self.topics, self.id)
        self.transport.meter = self.meter
        self.link: ParentLink | None = None
        if self.parent is not None:
            self.link = ParentLink(
                node=self.id,
                parent=self.parent,
                topics=self.topics,
                transport=self.transport,
                sync=ParentSync(dict(self.params), 0, max_staleness=settings.max_staleness),
                hmac_key=bytes.fromhex(settings.hmac_key) if settings.hmac_key else None,
                codec=settings.update_codec,
                fraction=settings.topk_fraction,
                retry_s=settings.mqtt.reconnect_min_s,
            )
        self.telemetry = Telemetry(
            self.transport,
            self.topics,
            role=self.role,
            sender=self.id,
            parent=self.parent,
            metrics=settings.metrics,
        )
        self.last_metrics: dict[str, MetricValue] = {}
        self.driver = Driver(self)
        self._parent_model: tuple[int, Params] | None = None
        self._model_key = load_private_key(settings.model_key) if settings.model_key else None
        self._parent_key = load_public_key(settings.parent_key) if settings.parent_key else None
        if self.parent is not None and self._parent_key is None:
            warn_unsigned(self.id, self.parent)
        self.journal: Journal | None = None
        self._replay_later: list[tuple[Key, bytes]] = []
        self.downlink = Downlink(
            self.transport,
            self.topics,
            self.id,
            settings.mqtt.max_message_bytes,
            Shared(
                self.id,
                settings.downlink_dtype,
                settings.downlink_codec,
                settings.downlink_fraction,
            ),
            settings.whole_model,
        )
        self.feed: ModelFeed | None = None
        if self.parent is not None:
            self.feed = ModelFeed(
                self.topics,
                self.parent,
                spec=self.spec,
                public=self._parent_key,
                max_jump=settings.max_version_jump,
                max_bytes=self._payload_limit,
                always_delta=True,
                on_refuse=lambda exc: self.rejected.add(self.parent or "parent", exc),
            )
        self._wake = asyncio.Event()
        self._announce_due = False
        self._status_due = True
        self._wait_until = 0.0
        self._heartbeat_at = 0.0

    @property
    def sync(self) -> ParentSync | None:
        """The sync state with the parent (None for the cloud)."""
        return self.link.sync if self.link is not None else None

    @property
    def outbox(self) -> Outbox | None:
        """Sync updates not yet acknowledged by the broker (None for the cloud)."""
        return self.link.outbox if self.link is not None else None

    # --------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Aggregator:
        s = self.settings
        if s.checkpoint:
            self.store = CheckpointStore(self.state_dir)
            if self._restore(self.store.load(), self.downlink.model.restore(self.store).version):
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
        published, shared = self.downlink.model.mark.version, self.downlink.shared
        lost = shared.held is None and self.version > 0  # v0 is the seed's model, whole
        if published > self.version or (published == self.version and lost):
            # What was published as this version is a shared model this node cannot make
            # again (an older checkpoint): the next model is a new version, so that no
            # number names two. With the shared model saved, it resumes as it was.
            self.version = published + 1
            self.round.version = self.version
        if self.link is not None:
            self.link.open(self.state_dir / "sync.sqlite")
        for topic in (self.topics.updates_of(self.id), self.topics.statuses_of(self.id)):
            await self.transport.subscribe(topic)
        if self.feed is not None:
            self.feed.floor = self.feed.seen = self.link.sync.parent_version if self.link else None
            await self.feed.refresh(self.transport, None)
        await self.transport.__aenter__()
        log.info(
            "%s %s: task %s (%d parameters), version %d, round %d, parent %s, broker %s",
            self.role,
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
                with contextlib.suppress(*LOST):
                    await bounded(self.telemetry.offline(), GOODBYE_TIMEOUT_S)
        finally:
            await self.transport.close()
            if self.link is not None:
                self.link.close()
            if self.journal is not None:  # its entries stay: the next start replays them
                await asyncio.to_thread(self.journal.close)

    async def run(self) -> None:
        """Serve rounds until ``settings.rounds`` aggregations are done (0: until cancelled)."""
        workers = [self.driver.drive()]
        if self.link is not None:
            workers.append(self.link.flush())
        await first_completed(*workers)

    async def _on_connect(self) -> None:
        self._status_due = True
        self._announce_due = self.round.announced
        if self.link is not None:
            self.link.wake()
        self._wake.set()

    def _next_round(self, number: int) -> Round:
        s = self.settings
        fold = RoundFold.from_settings(s, self.norms)
        return Round(number, self.version, fold, s.min_updates, s.quorum)

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
        return self.link.sync.parent_version if self.link is not None else None

    async def _evaluate(self) -> dict[str, MetricValue]:
        s = self.settings
        if not (s.evaluate if s.evaluate is not None else self.role == "cloud"):
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
        fields = {
            **fields,
            **self.meter.fields(parent=self.parent is not None, children=True),
            "delta_bytes": self.downlink.delta_bytes,
            "model_bytes": self.downlink.model_bytes,
        }
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
            role=self.role,
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
