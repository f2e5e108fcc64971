"""A device's rounds: which models it trains, within what bounds, and how it declines.

The asyncio side of one training round: judge the round (selection, deadline,
policy), train in a worker thread, quantize, store the update with its seq (off
the event loop) and flush; or decline and say so in the Status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from ..outbox import DiskFull
from ..params import Params, l2_norm
from ..profiles import Decision, Reading
from ..tasks import TrainResult
from ..tasks.memory import OutOfMemory
from ..tasks.training import TrainingStopped, accepts
from ..wire import Announcement, MetricValue, QTensor, TrainConfig
from .limits import OverBudget, bound_config, with_budget
from .policy import DEADLINE_PASSED, MODEL_MISMATCH, decide
from .update import float32_bytes, is_finite
from .worker import run_stoppable

if TYPE_CHECKING:
    from .agent import DeviceAgent

log = logging.getLogger(__name__)

#: How long a stop waits for a training thread that ignores its stop flag.
STOP_WAIT_S = 10.0
#: How long a model that arrived mid-connect waits for the session to be up.
SESSION_WAIT_S = 5.0
#: Update metrics that travel inside the Update itself (the rest go to the metrics topic).
UPDATE_METRICS = ("loss", "loss_before", "train_ms", "samples")
#: The outbox state key of the device's progress (round trained, residual).
PROGRESS_KEY = "device.progress"
#: TrainConfig fields a model may ask for only within the device's own bounds.
_BOUNDED = {"epochs", "batch_size"}


class Rounds:
    """The agent's round loop (``run``, one of its tasks) and what a round does."""

    def __init__(self, agent: DeviceAgent) -> None:
        self.agent = agent
        self.last_reason = ""  # of the latest decline

    async def run(self) -> None:
        agent = self.agent
        while True:
            await agent._model_due.wait()
            agent._model_due.clear()
            await self.session_up()
            model = agent._latest
            if model is None or agent.wanted() is None:
                continue
            params = agent.feed.held
            fetching = params is None or agent.feed.version != model.version
            if fetching and not agent.mismatch:
                continue  # its delta or whole model wakes us again
            reading = agent.reader.read()
            decision = self.decide(reading, model)
            if decision.ok:
                agent._declined_for = None
                assert params is not None  # a mismatched model never passes decide()
                await self.train_round(model, dict(params))
                await agent.fetch()  # trained: the model topics are not needed now
            else:
                await self.decline(model, decision.reason, reading)

    async def session_up(self) -> None:
        """A retained model can arrive while the session is still subscribing; its
        status and metrics should not be lost to that moment, so wait for it (bounded)."""
        agent = self.agent
        transport = agent.transport
        if transport is not None and not transport.connected:
            with contextlib.suppress(asyncio.TimeoutError):
                await transport.wait_connected(SESSION_WAIT_S)

    def decide(self, reading: Reading, model: Announcement | None) -> Decision:
        agent = self.agent
        if agent.mismatch:
            return Decision(False, MODEL_MISMATCH)
        now = agent.clock()
        deadline = self.deadline(model)
        # The round's codec and k follow the uplink and the time left, within the
        # node's limits; the deadline check weighs the update that codec makes.
        kbps = reading.uplink_kbps if reading.uplink_kbps is not None else agent.uplink.kbps
        plan = agent.encoder.choose(
            agent.spec,
            model.config if model is not None else TrainConfig(),
            kbps,
            deadline - now if deadline > 0 else None,
        )
        return decide(
            agent.policy,
            agent.settings.policy,
            reading,
            expected_bytes=plan.bytes,
            deadline=deadline,
            now=now,
            **agent.energy.now(),
        )

    def deadline(self, model: Announcement | None) -> float:
        """The latest model's deadline on *our* clock (0: none).

        The node says how long the round had left when it published (``deadline -
        sent_at``, both on its clock); that duration counts from when the model
        arrived here, so a board whose clock is off (no RTC before NTP) is not fooled.
        A node that sends no ``sent_at`` is judged by wall-clock time, as before.
        """
        agent = self.agent
        if model is None or model.deadline <= 0:
            return 0.0
        if model.sent_at <= 0:
            return model.deadline
        return agent._received_at + (model.deadline - model.sent_at)

    def pending(self) -> Announcement | None:
        """The latest model if it was declined and its deadline is still ahead."""
        agent = self.agent
        model, declined = agent._latest, agent._declined_for
        if model is None or declined is None or declined[0] != (model.round, model.version):
            return None
        now = agent.clock()
        if declined[1] == DEADLINE_PASSED or 0 < self.deadline(model) <= now:
            return None
        return model

    async def decline(self, model: Announcement, reason: str, reading: Reading) -> None:
        agent = self.agent
        key = (model.round, model.version)
        if agent._declined_for == (key, reason):
            return  # the same verdict on the same round counts once
        agent._declined_for = (key, reason)
        agent.declined[reason] += 1
        # INFO when the reason changes; a device at its duty cycle declines every round.
        level = logging.DEBUG if reason == self.last_reason else logging.INFO
        self.last_reason = reason
        log.log(level, "device %s: round %d (v%d) declined: %s", agent.id, *key, reason)
        # Said in the Status, so the node stops waiting for us this round. A late model
        # says nothing about the device itself: it stays eligible for the next one.
        late = reason == DEADLINE_PASSED
        verdict = self.decide(reading, None) if late else Decision(False, reason)
        await agent._publish_status(reading, verdict, declined=(key[0], reason))
        fields: dict[str, MetricValue] = {
            "event": "declined",
            "round": key[0],
            "version": key[1],
            "reason": reason,
        }
        await agent._metrics(fields, reading)

    async def train_round(self, model: Announcement, params: Params) -> None:
        agent = self.agent
        started = time.perf_counter()
        key = (model.round, model.version)
        try:
            result, tensors, quantize_ms = await run_stoppable(
                lambda: self.train(model, params),
                agent._stop,
                name=f"train-{agent.id}",
                wait_s=STOP_WAIT_S,
            )
        except (OverBudget, OutOfMemory) as exc:  # anything else is a defect: raised
            reason = "out_of_memory" if isinstance(exc, OutOfMemory) else "train_failed"
            log.error("device %s: training round %d failed: %s", agent.id, model.round, exc)
            agent.declined[reason] += 1
            agent.progress.trained = key
            return
        if tensors is None:
            log.warning("device %s: round %d diverged; nothing sent", agent.id, model.round)
            agent.declined["diverged"] += 1
            agent.progress.trained = key
            return
        stored = time.perf_counter()
        made = await self.store(model, result, tensors)
        if made is None:
            return  # the disk is full: logged and counted in declined
        seq, size, encode_ms = made
        store_ms = (time.perf_counter() - stored) * 1000.0
        agent.rounds_trained += 1
        agent._status_due.set()  # buffered changed
        sent, upload_ms = await agent._flush()
        m = result.metrics
        energy = await agent.energy.spend(agent._box(), m.get("train_ms", 0.0), size, agent.id)
        log.info(
            "device %s: round %d (v%d) trained on %d samples, loss %.4f -> %.4f in %.0f ms; "
            "update seq %d, %d bytes, %s",
            agent.id,
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
            **energy,
            "codec": agent.encoder.plan.codec,
            "fraction": agent.encoder.plan.fraction,
            "compression": float32_bytes(agent.spec) / size,
            "upload_ms": upload_ms,
            "uploaded": sent,
            "round_ms": (time.perf_counter() - started) * 1000.0,
            "residual_norm": l2_norm(agent.encoder.feedback.residual),
        }
        await agent._metrics(fields, agent.reader.read())

    def train(
        self, model: Announcement, params: Params
    ) -> tuple[TrainResult, list[QTensor] | None, float]:
        """In the worker thread: local training of ``params`` (the round's version), then
        quantization."""
        agent = self.agent
        s = agent.settings
        # OpenMP thread limits are per thread: a new training thread would
        # otherwise use every core, and a board's agent must leave some free.
        torch.set_num_threads(s.torch_threads)
        cfg = bound_config(model.config, max_epochs=s.max_epochs, min_batch_size=s.min_batch_size)
        if cfg is not model.config:
            agent.clamped += 1
            if agent.clamped == 1:
                asked, used = (c.model_dump(include=_BOUNDED) for c in (model.config, cfg))
                log.warning("device %s: model asks %s; trains %s (once)", agent.id, asked, used)
        should_stop = with_budget(agent._stop.is_set, s.max_train_s)
        extra: dict[str, Any] = {"should_stop": should_stop} if agent._stoppable else {}
        if s.free_memory_mb is not None and accepts(agent.task.train, "free_memory_mb"):
            extra["free_memory_mb"] = s.free_memory_mb
        start = time.perf_counter()
        try:
            result = agent.task.train(
                params,
                agent.data,
                cfg,
                precision=s.precision,
                device=s.compute,
                global_params=params if cfg.mu > 0 else None,
                seed=(s.seed * 1_000_003 + model.round) % 2**31,
                **extra,
            )
        except TrainingStopped:
            if agent._stop.is_set():
                raise
            raise OverBudget(f"stopped at max_train_s = {s.max_train_s:g} s") from None
        result.metrics["task_ms"] = (time.perf_counter() - start) * 1000.0
        if not is_finite(result.delta):
            return result, None, 0.0
        start = time.perf_counter()
        tensors = agent.encoder.tensors(result.delta, model.round)
        return result, tensors, (time.perf_counter() - start) * 1000.0

    async def store(
        self, model: Announcement, result: TrainResult, tensors: list[QTensor]
    ) -> tuple[int, int, float] | None:
        """Save the progress (round trained, residual), then seq, signature and entry.

        Two outbox transactions in one worker thread that holds the outbox, so
        neither a stop nor another call falls between them. Progress first: a crash
        between the two loses this round's update rather than letting the restarted
        device train the round again and send it twice (a node dedupes by seq, not
        by round). None when the disk has no room for them even with the outbox
        emptied: the round is counted as ``disk_full`` and the device goes on.
        """
        agent = self.agent
        box = agent._box()
        made: dict[str, float] = {}
        metrics = {k: result.metrics[k] for k in UPDATE_METRICS if k in result.metrics}

        def build(seq: int) -> bytes:
            start = time.perf_counter()
            payload = agent.encoder.encode(
                tensors,
                seq=seq,
                round_=model.round,
                base=model.version,
                n=result.n,
                metrics=metrics,
                inc=box.incarnation,
                # Nothing below the oldest entry kept is waited for (receipted, or
                # dropped by the caps): the node's receipt may pass those gaps.
                low=_lowest(box.lowest_seq(agent.id), seq),
            )
            made["encode_ms"] = (time.perf_counter() - start) * 1000.0
            made["size"] = len(payload)
            return payload

        def write() -> int:
            with box.held():
                box.set_state(PROGRESS_KEY, agent.progress.dump())
                return box.put_with_seq(agent.id, agent.update_topic, build)[1]

        agent.progress.trained = (model.round, model.version)
        agent.progress.residual = agent.encoder.feedback.residual
        try:
            seq = await asyncio.to_thread(write)
        except DiskFull as exc:
            agent.declined["disk_full"] += 1
            log.warning(
                "device %s: round %d (v%d) trained, update not stored: %s",
                agent.id,
                model.round,
                model.version,
                exc,
            )
            return None
        return seq, int(made["size"]), made["encode_ms"]


def _lowest(kept: int | None, seq: int) -> int:
    """The lowest seq the device keeps once ``seq`` is stored."""
    return seq if kept is None else min(kept, seq)
