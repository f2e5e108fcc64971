"""DeviceAgent: the asyncio shell that receives models, trains, and buffers and sends updates.

It owns one MQTT session, a daemon thread per training run and the outbox; the
maths and the rules live in update.py, policy.py and the task. It never blocks its
event loop on training and never lets an exception from the network stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError, DeviceSettings
from ..delivery import Uploader
from ..fetch import ModelFeed
from ..outbox import Outbox
from ..profiles import Decision, Reading, UplinkEstimator
from ..signing import load_public_key, warn_unsigned
from ..supervise import first_completed, wait_event
from ..tasks import DeviceData, Task, load_task, set_torch_threads
from ..tasks.training import accepts_should_stop
from ..telemetry import ByteMeter, Telemetry
from ..topics import Topics
from ..transport import LOST, AnyTransport, Message, TransportFactory
from ..wire import Announcement, MetricValue, Status
from .energy import EnergyAccount
from .inference import Endpoint, Inference, Prediction
from .policy import policy_of, selected
from .records import device_status, finite, profile_fields, status_key
from .rounds import PROGRESS_KEY, Rounds
from .session import link
from .update import Progress, UpdateEncoder

log = logging.getLogger(__name__)

#: The profile is re-read this often; Status goes out on change or every heartbeat.
STATUS_POLL_S = 5.0
#: How often the outbox is looked at for updates whose receipt is late.
RESEND_POLL_S = 5.0


class DeviceAgent:
    """One device: ``async with DeviceAgent(settings) as agent: await agent.run()``.

    Injection points (a fleet simulator runs many of these in one process):

    - ``task``: a ready Task (default ``load_task(settings.task, **settings.task_options)``).
    - ``data``: this device's DeviceData (default ``task.device_data(shard, num_shards)``),
      so that devices in one process share one dataset.
    - ``reader``: anything with ``read() -> profiles.Reading`` (default ``profiles.OsReader``);
      if it has an ``uplink`` UplinkEstimator, timed publishes feed it.
    - ``clock``: unix seconds, compared with a Model's ``deadline`` and stamped on Status.
    - ``online``: while it returns False the agent holds no MQTT session (a lost link:
      nothing is published, updates wait in the outbox); it reconnects when True again.
    - ``delay``: seconds to wait before sending an entry of ``n`` bytes (a simulated uplink).
    - ``transport``: a ``TransportFactory`` (default: MQTT on ``settings.mqtt``);
      ``MemoryBroker().factory()`` runs the agent on the in-memory bus.
    - ``encoder``: the ``UpdateEncoder`` (default: from ``settings``); ``open_outbox``:
      what opens the outbox file (default ``Outbox``), e.g. a subclass that counts.
    """

    def __init__(
        self,
        settings: DeviceSettings,
        task: Task | None = None,
        *,
        reader: Any = None,
        clock: Callable[[], float] = time.time,
        online: Callable[[], bool] | None = None,
        delay: Callable[[int], float] | None = None,
        data: DeviceData | None = None,
        transport: TransportFactory | None = None,
        encoder: UpdateEncoder | None = None,
        open_outbox: Callable[..., Outbox] = Outbox,
    ) -> None:
        self.settings = settings
        self._transport = transport
        self.id = settings.id
        self.topics = Topics(settings.mqtt.prefix)
        self.update_topic = self.topics.update(settings.gateway, settings.id)
        self.encoder = encoder or UpdateEncoder(settings)  # a bad key fails before the task
        self._open_outbox = open_outbox
        key = settings.parent_key
        self.parent_key = load_public_key(key) if key else None
        if key is None:
            warn_unsigned(f"device {settings.id}", settings.gateway)
        try:
            self.task = task or load_task(settings.task, **settings.task_options)
            self.data = data or self.task.device_data(settings.shard, settings.num_shards)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
        if reader is None:
            from ..profiles import OsReader

            reader = OsReader()
        self.reader = reader
        found = getattr(reader, "uplink", None)
        self.uplink = found if isinstance(found, UplinkEstimator) else UplinkEstimator()
        self.policy = policy_of(settings.policy)
        self.clock = clock
        self._online = online
        self.spec = self.task.spec()
        self._stoppable = accepts_should_stop(self.task.train)

        self.outbox: Outbox | None = None
        window = min(settings.mqtt.max_inflight, 8)
        self.uploader = Uploader(window=window, estimator=self.uplink, delay=delay)
        self.transport: AnyTransport | None = None
        self.telemetry: Telemetry | None = None
        self.progress = Progress()
        self.rounds_trained = 0
        self.declined: Counter[str] = Counter()  # rounds not trained, by reason
        self.feed = ModelFeed(
            self.topics,
            settings.gateway,
            spec=self.spec,
            public=self.parent_key,
            max_jump=settings.max_version_jump,
        )
        self.meter = ByteMeter(self.topics, self.id)
        self.ignored: Counter[str] = self.feed.ignored  # bad model payloads, by reason
        #: the node's latest model does not fit our task (another model or task option)
        self.mismatch = False
        self.clamped = 0  # rounds whose training config asked for more than the bounds
        self.last_metrics: dict[str, MetricValue] = {}
        self.last_status: Status | None = None
        self._latest: Announcement | None = None
        self._received_at = 0.0  # our clock when the latest announcement arrived
        self._declined_for: tuple[tuple[int, int], str] | None = None
        self._stop = threading.Event()
        self._model_due = asyncio.Event()
        self._status_due = asyncio.Event()
        self._flush_due = asyncio.Event()
        self._status_sent_at = -math.inf
        self.rounds = Rounds(self)
        self.energy = EnergyAccount(settings.energy, self.clock)
        self.inference = Inference(
            getattr(self.task, "build_model", None),
            tuple(self.data.source_x.shape[1:]),
            settings.inference,
        )
        self.endpoint: Endpoint | None = None

    # ------------------------------------------------------------- lifecycle
    @property
    def state_path(self) -> Path:
        """The outbox file, which also keeps the progress and the residual."""
        return self.settings.state_dir / f"device-{self.id}.db"

    async def __aenter__(self) -> DeviceAgent:
        s = self.settings
        # An unreadable file is set aside there and a new one (new incarnation) created.
        box = await asyncio.to_thread(
            self._open_outbox,
            self.state_path,
            max_entries=s.outbox_max_entries,
            max_bytes=s.outbox_max_bytes,
        )
        self.outbox = box
        saved, backlog = await asyncio.to_thread(
            lambda: (box.get_state(PROGRESS_KEY), box.backlog())
        )
        self.progress = Progress.load(saved)
        await self.energy.load(box)
        if s.inference.port:
            try:
                self.endpoint = Endpoint(self.inference, s.inference.port)
            except OSError as exc:
                raise ConfigError(f"inference.port {s.inference.port}: {exc}") from None
            self.endpoint.start()
        if self.encoder.error_feedback:
            self.encoder.feedback.residual = self.progress.residual
        log.info(
            "device %s: task %s, %d samples, gateway %s at %s, %d updates buffered, "
            "%d waiting for a receipt",
            self.id,
            s.task,
            len(self.data),
            s.gateway,
            s.mqtt.broker,
            backlog.pending,
            backlog.unreceipted,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self.endpoint is not None:
            await asyncio.to_thread(self.endpoint.stop)
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.close)

    def _box(self) -> Outbox:
        if self.outbox is None:
            raise RuntimeError("use 'async with DeviceAgent(...) as agent' before run()")
        return self.outbox

    @property
    def connected(self) -> bool:
        return self.transport is not None and self.transport.connected

    async def run(self) -> None:
        """Serve until cancelled: the session, rounds, status heartbeats and outbox flushes."""
        self._box()
        await first_completed(
            link(self),
            self.rounds.run(),
            self._heartbeat(),
            self._flusher(),
            self.inference.run(),
        )

    # ---------------------------------------------------------- MQTT session
    async def _on_connect(self) -> None:
        self.last_status = None  # a restarted broker lost our retained status
        self.uploader.new_session()  # and maybe the updates it acknowledged: send them again
        self._status_due.set()
        self._flush_due.set()

    def _on_message(self, message: Message) -> None:
        got = self.feed.on_message(message.topic, message.payload)
        if self.feed.mismatch != self.mismatch:
            self.mismatch = self.feed.mismatch
            self._status_due.set()  # eligible or not: the node must know
            self._model_due.set()
        if isinstance(got, Announcement):
            # Accepted: the gateway's own (when parent_key is set), not older than the
            # version held. What acts on a round goes from here on.
            self._note_receipt(got)
            self._latest, self._received_at = got, self.clock()
            self._model_due.set()
        elif got:  # the model moved to a new version
            self.energy.received += len(message.payload)
            version, held = self.feed.version, self.feed.held
            if version is not None and held is not None and self.inference.wants(version):
                self.inference.offer(version, held)
            self.progress.model_version = self.feed.version
            self._status_due.set()
            self._model_due.set()

    def wanted(self) -> int | None:
        """The version this device must hold now: the latest round's, if it trains it."""
        ann = self._latest
        if ann is None or not selected(ann, self.id):
            return None
        if (ann.round, ann.version) == self.progress.trained:
            return None
        return ann.version

    async def fetch(self) -> None:
        """Subscribe to the delta or whole model this round needs; drop what it does not."""
        transport = self.transport
        if transport is not None:
            with contextlib.suppress(*LOST):
                await self.feed.refresh(transport, self.wanted())

    # ---------------------------------------------------------------- outbox
    async def _flusher(self) -> None:
        while True:
            # Also polled: a delivered update whose receipt is late becomes due again.
            await wait_event(self._flush_due, RESEND_POLL_S)
            self._flush_due.clear()
            await self._flush()

    async def _flush(self) -> tuple[int, float]:
        sent, ms = await self.uploader.flush(self._box(), self.transport)
        if sent:
            self._status_due.set()  # buffered changed
        return sent, ms

    def _note_receipt(self, model: Announcement) -> None:
        """An accepted announcement from the gateway: its receipt for us clears the outbox."""
        self.uploader.note(model, self.id)
        if self.id in model.receipts:
            self._flush_due.set()

    # ------------------------------------------------------- status, metrics
    async def _heartbeat(self) -> None:
        poll = min(self.settings.heartbeat_s, STATUS_POLL_S)
        while True:
            await wait_event(self._status_due, poll)
            self._status_due.clear()
            reading = self.reader.read()
            pending = self.rounds.pending()
            decision = self.rounds.decide(reading, pending)
            if pending is not None and decision.ok:
                self._model_due.set()  # things changed: try the declined round again
            await self.fetch()  # a delta that did not come gives way to the whole model
            await self._publish_status(reading, decision)

    async def _publish_status(
        self, reading: Reading, decision: Decision, declined: tuple[int, str] | None = None
    ) -> None:
        """Publish on a change (battery in whole percent) or once the heartbeat is due.

        ``declined``: the round just declined and why, which the node reads."""
        backlog = await asyncio.to_thread(self._box().backlog)
        if self.connected and backlog.pending:
            self._flush_due.set()
        status = device_status(
            self.id,
            reading,
            decision,
            uplink_kbps=self.uplink.kbps,
            buffered=backlog.pending,
            model_version=self.progress.model_version,
            ts=self.clock(),
            samples=len(self.data),
            declined=declined,
        )
        now = time.monotonic()
        last = self.last_status
        same = last is not None and status_key(status) == status_key(last)
        if same and now - self._status_sent_at < self.settings.heartbeat_s:
            return
        if self.telemetry is not None and self.connected and await self.telemetry.status(status):
            self.last_status = status
            self._status_sent_at = now

    async def _metrics(self, fields: dict[str, MetricValue], reading: Reading) -> None:
        backlog = await asyncio.to_thread(self._box().backlog)
        self.last_metrics = finite(
            {
                **fields,
                **profile_fields(reading, self.uplink.kbps),
                "buffered": backlog.pending,
                "buffered_bytes": backlog.bytes,
                "dropped": backlog.dropped,
                "rounds_trained": self.rounds_trained,
                "declined": sum(self.declined.values()),
                **{f"declined_{r}": c for r, c in sorted(self.declined.items())},
                "ignored_models": sum(self.ignored.values()),
                **self.meter.fields(parent=True, children=False),
            }
        )
        if self.telemetry is not None:
            await self.telemetry.metrics(self.last_metrics)

    # ------------------------------------------------------------ predictions
    def predict(self, x: Any) -> Prediction:
        """The newest complete model's outputs for ``x`` (one row or a batch of rows).

        Answers while the device trains; raises ``NoModel`` before the first model and
        ``BadInput`` for rows that do not fit. Thread-safe.
        """
        return self.inference.predict(x)


async def serve_device(settings: DeviceSettings) -> None:
    """What ``edgefl device`` runs: one agent until SIGINT or SIGTERM."""
    set_torch_threads(settings.torch_threads)
    async with DeviceAgent(settings) as agent:
        await agent.run()
