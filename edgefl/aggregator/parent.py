"""A node's durable link to its parent: sync updates go through the outbox, in order.

The I/O side of ``sync.ParentSync``: takes the sync's seq from the outbox, signs and
encodes it, stores it on disk and publishes it (QoS 1) whenever connected; reads
the parent's receipts and stores the sync in flight again when the parent lost it.
The outbox drains through ``delivery.Uploader``, as a device's does; an entry leaves
it at its PUBACK, and the sync stays in flight (and in the checkpoint) until the
parent's receipt, so no sync is lost to a parent's crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..delivery import Uploader
from ..outbox import Outbox
from ..topics import Topics
from ..transport import AnyTransport
from ..wire import Announcement, encode_update, sign
from .sync import ParentSync, Verdict

log = logging.getLogger(__name__)

#: A stored sync: ``{"seq", "topic", "payload"}``.
PendingSync = dict[str, Any]


class ParentLink:
    """The sync channel of a node with a parent; ``flush`` runs as one of the node's tasks."""

    def __init__(
        self,
        *,
        node: str,
        parent: str,
        topics: Topics,
        transport: AnyTransport,
        sync: ParentSync,
        hmac_key: bytes | None = None,
        codec: str = "u8",
        fraction: float = 1.0,
        retry_s: float = 0.5,
    ) -> None:
        self.node = node
        self.parent = parent
        self.topic = topics.update(parent, node)
        self.transport = transport
        self.sync = sync
        self.hmac_key = hmac_key
        #: the sync's codec (a registered name) and, for a sparse one, its share of values
        self.codec = codec
        self.fraction = fraction
        self.retry_s = retry_s
        #: one sync in flight at a time, so one publish at a time
        self.uploader = Uploader(window=1)
        self.outbox: Outbox | None = None
        self._due = asyncio.Event()
        self._idle = asyncio.Event()
        #: outbox entries stored in this session and not yet acknowledged by the broker
        self._queued: set[int] = set()
        self._entry: int | None = None  # the entry of the sync in flight
        self._resend = False
        self._drop: int | None = None

    def open(self, path: Path) -> None:
        """Open the outbox and store the sync in flight again.

        That sync may or may not have reached the parent before we stopped; if the
        parent has it already, it drops the second copy as a duplicate seq.
        """
        self.outbox = Outbox(path)
        if self.sync.inflight is not None:
            self._queue(self.outbox.put(self.topic, self.sync.inflight.payload))

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.close()

    @property
    def buffered(self) -> int:
        """Sync updates waiting for the parent's broker."""
        return len(self.outbox) if self.outbox is not None else 0

    async def build(self, params: Mapping[str, np.ndarray], round_number: int) -> PendingSync:
        """The next sync update for ``params``, encoded and signed, with its seq.

        It is in flight from here on: the caller checkpoints that, then ``store``s the
        update (a stop in between stores it again at the next ``open``).
        """
        outbox = self._outbox()
        seq = await asyncio.to_thread(outbox.next_seq, self.node)
        update = self.sync.build(
            params,
            sender=self.node,
            seq=seq,
            round=round_number,
            codec=self.codec,
            fraction=self.fraction,
        )
        if self.hmac_key is not None:
            update = sign(update, self.hmac_key)
        payload = encode_update(update)
        self.sync.sent(update, payload)
        return {"seq": seq, "topic": self.topic, "payload": payload}

    async def store(self, pending: PendingSync) -> None:
        entry = await asyncio.to_thread(self._outbox().put, pending["topic"], pending["payload"])
        self._queue(entry)

    def on_model(self, model: Announcement) -> Verdict:
        """A checked parent announcement arrived: settle the sync in flight by its receipt."""
        sync, version = self.sync.inflight, model.version
        receipt = model.receipts.get(self.node)
        verdict = self.sync.on_parent(version, model.round, receipt, model.deadline)
        if sync is None or verdict == "wait":
            return verdict
        if verdict == "resend" and self._entry not in self._queued:
            log.info(
                "%s: %s v%d lacks sync %d: sent again", self.node, self.parent, version, sync.seq
            )
            self._resend = True
        elif verdict == "refused":
            log.info(
                "%s: sync %d (base %d) is too stale for %s v%d: its work goes into the next one",
                self.node,
                sync.seq,
                sync.base,
                self.parent,
                version,
            )
            self._drop = self._entry if self._entry in self._queued else None
        elif verdict == "confirmed":
            log.debug("%s: sync %d receipted by %s v%d", self.node, sync.seq, self.parent, version)
        self._due.set()
        return verdict

    def _queue(self, entry: int) -> None:
        self._queued.add(entry)
        self._entry = entry
        self._due.set()

    async def _requeue(self) -> None:
        """Apply what the parent's receipts asked for: drop a refused sync, resend a lost one."""
        outbox = self._outbox()
        drop, self._drop = self._drop, None
        if drop is not None:
            await asyncio.to_thread(outbox.ack, drop)
            self._queued.discard(drop)
        resend, self._resend = self._resend, False
        if resend and self.sync.inflight is not None:
            self._queue(await asyncio.to_thread(outbox.put, self.topic, self.sync.inflight.payload))

    def wake(self) -> None:
        """Try to deliver now (after a reconnect)."""
        self._due.set()

    async def flush(self) -> None:
        """Deliver stored sync updates, oldest first, for as long as the node runs."""
        outbox = self._outbox()
        self._due.set()
        while True:
            await self._due.wait()
            self._due.clear()
            await self._requeue()
            while await asyncio.to_thread(self._stored):
                self._idle.clear()
                await self.transport.wait_connected()
                failed = self.uploader.failed
                await self.uploader.flush(outbox, self.transport)
                # What left the outbox was acknowledged: no longer queued in this session.
                self._queued &= await asyncio.to_thread(self._stored)
                if self.uploader.failed > failed:
                    log.debug("%s: sync not delivered; again in %.1f s", self.node, self.retry_s)
                    await asyncio.sleep(self.retry_s)
                await self._requeue()
            self._idle.set()

    def _stored(self) -> set[int]:
        """The ids of every entry still in the outbox (blocking: run it in a thread)."""
        outbox = self._outbox()
        return {e.id for e in outbox.peek(len(outbox))}

    @property
    def idle(self) -> asyncio.Event:
        """Set while the outbox is empty (as far as the flusher knows)."""
        return self._idle

    def _outbox(self) -> Outbox:
        if self.outbox is None:
            raise RuntimeError("ParentLink.open() first")
        return self.outbox
