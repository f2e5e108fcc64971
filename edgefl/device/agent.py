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

import torch

from ..config import ConfigError, DeviceSettings
from ..outbox import DiskFull, Outbox
from ..params import l2_norm
from ..profiles import Decision, Reading, UplinkEstimator
from ..signing import check_model, load_public_key
from ..supervise import first_completed, wait_event
from ..tasks import DeviceData, Task, TrainResult, load_task, set_torch_threads
from ..tasks.training import TrainingStopped, accepts_should_stop
from ..telemetry import Telemetry, last_will
from ..topics import Topics
from ..transport import LOST, Message, Transport
from ..wire import MetricValue, Model, QTensor, Reason, Status, UpdateRejected, decode_model
from ..wire import model_params as wire_params
from .limits import OverBudget, bound_config, with_budget
from .policy import DEADLINE_PASSED, decide, policy_of, selected
from .report import device_status, finite, profile_fields, status_key
from .update import (
    Progress,
    UpdateEncoder,
    expected_update_bytes,
    float32_bytes,
    is_finite,
)
from .uplink import Uploader
from .worker import run_stoppable

log = logging.getLogger(__name__)

#: How long a stop waits for a training thread that ignores its stop flag.
STOP_WAIT_S = 10.0
#: How long a model that arrived mid-connect waits for the session to be up.
SESSION_WAIT_S = 5.0
#: How long a clean stop waits to publish ``online: false``.
GOODBYE_TIMEOUT_S = 2.0
#: The profile is re-read this often; Status goes out on change or every heartbeat.
STATUS_POLL_S = 5.0
#: How often an injected ``online()`` is asked while the agent waits for it to change.
LINK_POLL_S = 0.25
#: How often the outbox is looked at for updates whose receipt is late.
RESEND_POLL_S = 5.0
#: Update metrics that travel inside the Update itself (the rest go to the metrics topic).
UPDATE_METRICS = ("loss", "loss_before", "train_ms", "samples")

PROGRESS_KEY = "device.progress"
#: TrainConfig fields a model may ask for only within the device's own bounds.
_BOUNDED = {"epochs", "batch_size"}


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
    ) -> None:
        self.settings = settings
        self.id = settings.id
        self.topics = Topics(settings.mqtt.prefix)
        self.model_topic = self.topics.model(settings.gateway)
        self.update_topic = self.topics.update(settings.gateway, settings.id)
        self.encoder = UpdateEncoder(settings)  # a bad key fails before the task loads
        key = settings.parent_key
        self.parent_key = load_public_key(key) if key else None
        if key is None:
            _warn_unsigned(settings.id, settings.gateway)
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
        self.expected_bytes = expected_update_bytes(self.spec, settings.update_dtype)
        self._stoppable = accepts_should_stop(self.task.train)

        self.outbox: Outbox | None = None
        window = min(settings.mqtt.max_inflight, 8)
        self.uploader = Uploader(window=window, estimator=self.uplink, delay=delay)
        self.transport: Transport | None = None
        self.telemetry: Telemetry | None = None
        self.progress = Progress()
        self.rounds_trained = 0
        self.declined: Counter[str] = Counter()  # rounds not trained, by reason
        self.ignored: Counter[str] = Counter()  # bad model payloads, by reason
        self.clamped = 0  # rounds whose training config asked for more than the bounds
        self.last_metrics: dict[str, MetricValue] = {}
        self.last_status: Status | None = None
        self._latest: Model | None = None
        self._received_at = 0.0  # our clock when the latest model arrived
        self._declined_for: tuple[tuple[int, int], str] | None = None
        self._stop = threading.Event()
        self._model_due = asyncio.Event()
        self._status_due = asyncio.Event()
        self._flush_due = asyncio.Event()
        self._status_sent_at = -math.inf

    # ------------------------------------------------------------- lifecycle
    @property
    def state_path(self) -> Path:
        """The outbox file, which also keeps the progress and the residual."""
        return self.settings.state_dir / f"device-{self.id}.db"

    async def __aenter__(self) -> DeviceAgent:
        s = self.settings
        # An unreadable file is set aside there and a new one (new incarnation) created.
        box = await asyncio.to_thread(
            Outbox, self.state_path, max_entries=s.outbox_max_entries, max_bytes=s.outbox_max_bytes
        )
        self.outbox = box
        self.progress = Progress.load(box.get_state(PROGRESS_KEY))
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
            len(box),
            box.unreceipted,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self.outbox is not None:
            self.outbox.close()

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
        await first_completed(self._link(), self._rounds(), self._heartbeat(), self._flusher())

    # ---------------------------------------------------------- MQTT session
    async def _link(self) -> None:
        online = self._online
        if online is None:
            await self._session()
            return
        while True:
            await _until(online, True)
            await first_completed(self._session(), _until(online, False))

    async def _session(self) -> None:
        s = self.settings
        will = last_will(self.topics, s.gateway, self.id, "device")
        transport = Transport(s.mqtt, self.id, will=will, on_connect=self._on_connect)
        for topic in self.topics.model_filters(s.gateway):
            await transport.subscribe(topic)
        telemetry = Telemetry(
            transport,
            self.topics,
            role="device",
            sender=self.id,
            parent=s.gateway,
            metrics=s.metrics,
        )
        async with transport:
            self.transport, self.telemetry = transport, telemetry
            try:
                async for message in transport.messages():
                    self._on_message(message)
            finally:
                self.transport = None
                if self._online is None or self._online():  # a stop, not a lost link
                    with contextlib.suppress(*LOST):
                        await asyncio.wait_for(telemetry.offline(), GOODBYE_TIMEOUT_S)
                else:
                    # A simulated link loss ends the session cleanly, so the broker
                    # would not fire our will: publish it as the broker would have.
                    with contextlib.suppress(*LOST):
                        await asyncio.wait_for(
                            transport.publish(will.topic, will.payload, retain=True),
                            GOODBYE_TIMEOUT_S,
                        )

    async def _on_connect(self) -> None:
        self.last_status = None  # a restarted broker lost our retained status
        self.uploader.new_session()  # and maybe the updates it acknowledged: send them again
        self._status_due.set()
        self._flush_due.set()

    def _on_message(self, message: Message) -> None:
        if message.topic != self.model_topic or not message.payload:
            return  # a chunk sub-topic being cleared, or a deleted retained model
        s = self.settings
        try:
            model = decode_model(message.payload)
            if {t.name: tuple(t.shape) for t in model.tensors} != self.spec:
                raise UpdateRejected(Reason.SHAPE, "model does not match the task's parameters")
            check_model(
                model,
                held=self.progress.model_version,
                public=self.parent_key,
                max_jump=s.max_version_jump,
            )
        except UpdateRejected as exc:
            if not self.ignored[exc.reason.value]:
                log.warning("device %s: ignoring a bad model: %s", self.id, exc)
            self.ignored[exc.reason.value] += 1
            return
        # Accepted: the gateway's own model (when parent_key is set), not older than the
        # one held. What acts on an accepted model goes from here on.
        self._note_receipt(model)
        if model.version != self.progress.model_version:
            self.progress.model_version = model.version
            self._status_due.set()
        self._latest, self._received_at = model, self.clock()
        self._model_due.set()

    # ---------------------------------------------------------------- rounds
    async def _rounds(self) -> None:
        while True:
            await self._model_due.wait()
            self._model_due.clear()
            await self._session_up()
            model = self._latest
            if model is None or not selected(model, self.id):
                continue
            if (model.round, model.version) == self.progress.trained:
                continue
            reading = self.reader.read()
            decision = self._decide(reading, model)
            if decision.ok:
                self._declined_for = None
                await self._train_round(model)
            else:
                await self._decline(model, decision.reason, reading)

    async def _session_up(self) -> None:
        """A retained model can arrive while the session is still subscribing; its
        status and metrics should not be lost to that moment, so wait for it (bounded)."""
        transport = self.transport
        if transport is not None and not transport.connected:
            with contextlib.suppress(asyncio.TimeoutError):
                await transport.wait_connected(SESSION_WAIT_S)

    def _decide(self, reading: Reading, model: Model | None) -> Decision:
        now = self.clock()
        return decide(
            self.policy,
            self.settings.policy,
            reading,
            expected_bytes=self.expected_bytes,
            deadline=self._deadline(model),
            now=now,
        )

    def _deadline(self, model: Model | None) -> float:
        """The latest model's deadline on *our* clock (0: none).

        The node says how long the round had left when it published (``deadline -
        sent_at``, both on its clock); that duration counts from when the model
        arrived here, so a board whose clock is off (no RTC before NTP) is not fooled.
        A node that sends no ``sent_at`` is judged by wall-clock time, as before.
        """
        if model is None or model.deadline <= 0:
            return 0.0
        if model.sent_at <= 0:
            return model.deadline
        return self._received_at + (model.deadline - model.sent_at)

    def _pending(self) -> Model | None:
        """The latest model if it was declined and its deadline is still ahead."""
        model, declined = self._latest, self._declined_for
        if model is None or declined is None or declined[0] != (model.round, model.version):
            return None
        now = self.clock()
        if declined[1] == DEADLINE_PASSED or 0 < self._deadline(model) <= now:
            return None
        return model

    async def _decline(self, model: Model, reason: str, reading: Reading) -> None:
        key = (model.round, model.version)
        if self._declined_for == (key, reason):
            return  # the same verdict on the same round counts once
        self._declined_for = (key, reason)
        self.declined[reason] += 1
        log.info("device %s: round %d (v%d) declined: %s", self.id, *key, reason)
        # Said in the Status, so the node stops waiting for us this round. A late model
        # says nothing about the device itself: it stays eligible for the next one.
        late = reason == DEADLINE_PASSED
        verdict = self._decide(reading, None) if late else Decision(False, reason)
        await self._publish_status(reading, verdict, declined=(key[0], reason))
        fields: dict[str, MetricValue] = {
            "event": "declined",
            "round": key[0],
            "version": key[1],
            "reason": reason,
        }
        await self._metrics(fields, reading)

    async def _train_round(self, model: Model) -> None:
        started = time.perf_counter()
        key = (model.round, model.version)
        try:
            result, tensors, quantize_ms = await run_stoppable(
                lambda: self._train(model), self._stop, name=f"train-{self.id}", wait_s=STOP_WAIT_S
            )
        except RuntimeError as exc:  # torch's failures (CUDA out of memory, ...) skip a round
            log.error("device %s: training round %d failed: %s", self.id, model.round, exc)
            self.declined["train_failed"] += 1
            self.progress.trained = key
            return
        if tensors is None:
            log.warning("device %s: round %d diverged; nothing sent", self.id, model.round)
            self.declined["diverged"] += 1
            self.progress.trained = key
            return
        stored = time.perf_counter()
        made = await self._store(model, result, tensors)
        if made is None:
            return  # the disk is full: logged and counted in declined
        seq, size, encode_ms = made
        store_ms = (time.perf_counter() - stored) * 1000.0
        self.rounds_trained += 1
        self._status_due.set()  # buffered changed
        sent, upload_ms = await self._flush()
        m = result.metrics
        log.info(
            "device %s: round %d (v%d) trained on %d samples, loss %.4f -> %.4f in %.0f ms; "
            "update seq %d, %d bytes, %s",
            self.id,
            *key,
            result.n,
            m.get("loss_before", math.nan),
            m.get("loss", math.nan),
            m.get("train_ms", math.nan),
            seq,
            size,
            "sent" if sent else "buffered",
        )
        fields: dict[str, MetricValue] = {
            "event": "round",
            "round": key[0],
            "version": key[1],
            "seq": seq,
            **{k: float(v) for k, v in m.items()},
            "quantize_ms": quantize_ms,
            "encode_ms": encode_ms,
            "store_ms": store_ms,
            "upload_bytes": size,
            "compression": float32_bytes(self.spec) / size,
            "upload_ms": upload_ms,
            "uploaded": sent,
            "round_ms": (time.perf_counter() - started) * 1000.0,
            "residual_norm": l2_norm(self.encoder.feedback.residual),
        }
        await self._metrics(fields, self.reader.read())

    def _train(self, model: Model) -> tuple[TrainResult, list[QTensor] | None, float]:
        """In the worker thread: local training, then quantization."""
        s = self.settings
        # OpenMP thread limits are per thread: a new training thread would
        # otherwise use every core, and a board's agent must leave some free.
        torch.set_num_threads(s.torch_threads)
        params = wire_params(model)
        cfg = bound_config(model.config, max_epochs=s.max_epochs, min_batch_size=s.min_batch_size)
        if cfg is not model.config:
            self.clamped += 1
            if self.clamped == 1:
                asked, used = (c.model_dump(include=_BOUNDED) for c in (model.config, cfg))
                log.warning("device %s: model asks %s; trains %s (once)", self.id, asked, used)
        should_stop = with_budget(self._stop.is_set, s.max_train_s)
        extra: dict[str, Any] = {"should_stop": should_stop} if self._stoppable else {}
        start = time.perf_counter()
        try:
            result = self.task.train(
                params,
                self.data,
                cfg,
                precision=s.precision,
                device=s.compute,
                global_params=params if cfg.mu > 0 else None,
                seed=(s.seed * 1_000_003 + model.round) % 2**31,
                **extra,
            )
        except TrainingStopped:
            if self._stop.is_set():
                raise
            raise OverBudget(f"stopped at max_train_s = {s.max_train_s:g} s") from None
        result.metrics["task_ms"] = (time.perf_counter() - start) * 1000.0
        if not is_finite(result.delta):
            return result, None, 0.0
        start = time.perf_counter()
        tensors = self.encoder.tensors(result.delta, model.round)
        return result, tensors, (time.perf_counter() - start) * 1000.0

    async def _store(
        self, model: Model, result: TrainResult, tensors: list[QTensor]
    ) -> tuple[int, int, float] | None:
        """Save the progress (round trained, residual), then seq, signature and entry.

        Two outbox transactions in one worker thread that holds the outbox, so
        neither a stop nor another call falls between them. Progress first: a crash
        between the two loses this round's update rather than letting the restarted
        device train the round again and send it twice (a node dedupes by seq, not
        by round). None when the disk has no room for them even with the outbox
        emptied: the round is counted as ``disk_full`` and the device goes on.
        """
        box = self._box()
        made: dict[str, float] = {}
        metrics = {k: result.metrics[k] for k in UPDATE_METRICS if k in result.metrics}

        def build(seq: int) -> bytes:
            start = time.perf_counter()
            payload = self.encoder.encode(
                tensors,
                seq=seq,
                round_=model.round,
                base=model.version,
                n=result.n,
                metrics=metrics,
                inc=box.incarnation,
            )
            made["encode_ms"] = (time.perf_counter() - start) * 1000.0
            made["size"] = len(payload)
            return payload

        def write() -> int:
            with box.held():
                box.set_state(PROGRESS_KEY, self.progress.dump())
                return box.put_with_seq(self.id, self.update_topic, build)[1]

        self.progress.trained = (model.round, model.version)
        self.progress.residual = self.encoder.feedback.residual
        try:
            seq = await asyncio.to_thread(write)
        except DiskFull as exc:
            self.declined["disk_full"] += 1
            log.warning(
                "device %s: round %d (v%d) trained, update not stored: %s",
                self.id,
                model.round,
                model.version,
                exc,
            )
            return None
        return seq, int(made["size"]), made["encode_ms"]

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

    def _note_receipt(self, model: Model) -> None:
        """An accepted model from the gateway: its receipt for us clears the outbox."""
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
            pending = self._pending()
            decision = self._decide(reading, pending)
            if pending is not None and decision.ok:
                self._model_due.set()  # things changed: try the declined round again
            if self.connected and len(self._box()):
                self._flush_due.set()
            await self._publish_status(reading, decision)

    async def _publish_status(
        self, reading: Reading, decision: Decision, declined: tuple[int, str] | None = None
    ) -> None:
        """Publish on a change (battery in whole percent) or once the heartbeat is due.

        ``declined``: the round just declined and why, which the node reads."""
        status = device_status(
            self.id,
            reading,
            decision,
            uplink_kbps=self.uplink.kbps,
            buffered=len(self._box()),
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
        box = self._box()
        self.last_metrics = finite(
            {
                **fields,
                **profile_fields(reading, self.uplink.kbps),
                "buffered": len(box),
                "buffered_bytes": box.bytes,
                "dropped": box.dropped,
                "rounds_trained": self.rounds_trained,
                "declined": sum(self.declined.values()),
                **{f"declined_{r}": c for r, c in sorted(self.declined.items())},
                "ignored_models": sum(self.ignored.values()),
            }
        )
        if self.telemetry is not None:
            await self.telemetry.metrics(self.last_metrics)


_warned: set[str] = set()


def _warn_unsigned(device: str, gateway: str) -> None:
    """Once per process: a simulator runs thousands of agents in one."""
    if not _warned:
        _warned.add(device)
        log.warning(
            "device %s: no parent_key: unsigned models from %s are accepted (logged once)",
            device,
            gateway,
        )


async def _until(online: Callable[[], bool], wanted: bool) -> None:
    while online() != wanted:
        await asyncio.sleep(LINK_POLL_S)


async def serve_device(settings: DeviceSettings) -> None:
    """What ``edgefl device`` runs: one agent until SIGINT or SIGTERM."""
    set_torch_threads(settings.torch_threads)
    async with DeviceAgent(settings) as agent:
        await agent.run()
