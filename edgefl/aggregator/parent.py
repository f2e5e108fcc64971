"""A node's durable link to its parent: sync updates go through the outbox, in order.

The I/O side of ``uplink.Uplink``: takes the sync's seq from the outbox, signs and
encodes it, stores it on disk and publishes it (QoS 1) whenever connected. An
entry leaves the outbox only after its PUBACK, so a sync made while the parent
is unreachable is delivered later, even across a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..outbox import Outbox
from ..topics import Topics
from ..transport import NotConnected, PublishTimeout, Transport
from ..wire import encode_update, sign
from .uplink import Uplink

log = logging.getLogger("edgefl.aggregator")

#: A stored sync: ``{"seq", "topic", "payload"}``, kept in the checkpoint it belongs to.
PendingSync = dict[str, Any]


class ParentLink:
    """The sync channel of a node with a parent; ``flush`` runs as one of the node's tasks."""

    def __init__(
        self,
        *,
        node: str,
        parent: str,
        topics: Topics,
        transport: Transport,
        uplink: Uplink,
        hmac_key: bytes | None = None,
        dtype: Literal["u8", "f32"] = "u8",
        retry_s: float = 0.5,
    ) -> None:
        self.node = node
        self.parent = parent
        self.topic = topics.update(parent, node)
        self.transport = transport
        self.uplink = uplink
        self.hmac_key = hmac_key
        self.dtype = dtype
        self.retry_s = retry_s
        self.outbox: Outbox | None = None
        self._due = asyncio.Event()
        self._idle = asyncio.Event()

    def open(self, path: Path, restored: PendingSync | None = None) -> None:
        """Open the outbox; ``restored`` is the sync of the checkpoint we resumed from.

        That sync may or may not have reached the outbox before we stopped: it is
        stored again, and if it was there (or even delivered) already the parent
        drops the second copy as a duplicate seq.
        """
        self.outbox = Outbox(path)
        if restored:
            self.outbox.put(restored["topic"], restored["payload"])

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.close()

    @property
    def buffered(self) -> int:
        """Sync updates waiting for the parent's broker."""
        return len(self.outbox) if self.outbox is not None else 0

    async def build(self, params: Mapping[str, np.ndarray], round_number: int) -> PendingSync:
        """The next sync update for ``params``, encoded and signed, with its seq.

        The uplink counts it as sent from here on: the caller checkpoints that, then
        ``store``s the update (see ``open`` for a stop in between).
        """
        outbox = self._outbox()
        seq = await asyncio.to_thread(outbox.next_seq, self.node)
        update = self.uplink.build(
            params, sender=self.node, seq=seq, round=round_number, dtype=self.dtype
        )
        if self.hmac_key is not None:
            update = sign(update, self.hmac_key)
        self.uplink.sent(params)
        return {"seq": seq, "topic": self.topic, "payload": encode_update(update)}

    async def store(self, pending: PendingSync) -> None:
        await asyncio.to_thread(self._outbox().put, pending["topic"], pending["payload"])
        self._due.set()

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
            while entries := await asyncio.to_thread(outbox.peek, 8):
                self._idle.clear()
                await self.transport.wait_connected()
                try:
                    for entry in entries:
                        await self.transport.publish(entry.topic, entry.payload)
                        await asyncio.to_thread(outbox.ack, entry.id)
                except (NotConnected, PublishTimeout) as exc:
                    log.debug("%s: sync not delivered yet: %s", self.node, exc)
                    await asyncio.sleep(self.retry_s)
            self._idle.set()

    @property
    def idle(self) -> asyncio.Event:
        """Set while the outbox is empty (as far as the flusher knows)."""
        return self._idle

    def _outbox(self) -> Outbox:
        if self.outbox is None:
            raise RuntimeError("ParentLink.open() first")
        return self.outbox
