"""A node's retained model on the broker: one form at a time, one model per version.

Before a model goes out, the highest version published and the retained topics it
may leave behind are marked durably (``checkpoint.Published``); once it is out, the
other form's leftovers are cleared: the whole model when it travels in chunks, the
chunk sub-topics when it travels whole. It never lowers the mark.
"""

from __future__ import annotations

import asyncio

from ..checkpoint import CheckpointStore, Published
from ..transport import AnyTransport, chunk_topic, split


class RetainedModel:
    """Publishes a node's Model retained on ``topic``, whole or in chunks as the size says."""

    def __init__(self, transport: AnyTransport, topic: str, max_message_bytes: int) -> None:
        self.transport = transport
        self.topic = topic
        self.max_message_bytes = max_message_bytes
        self.store: CheckpointStore | None = None
        #: without a store nothing is known of an earlier run: a whole model may be there
        self.mark = Published(whole=True)

    def restore(self, store: CheckpointStore) -> Published:
        """Read what an earlier run left on the broker; returns the mark."""
        self.store = store
        self.mark = store.published()
        return self.mark

    async def publish(self, payload: bytes, version: int) -> None:
        """Mark, publish ``payload`` as ``version``, clear the other form, mark again.

        Raises what ``Transport.publish`` raises; the mark then still names every
        topic that may hold a model, so the next publish clears them.
        """
        chunks = (
            0
            if len(payload) <= self.max_message_bytes
            else len(split(payload, self.max_message_bytes))
        )
        whole, known = chunks == 0, self.mark
        wider = Published(
            max(known.version, version), known.whole or whole, max(known.chunks, chunks)
        )
        await self._mark(wider)
        await self.transport.publish(self.topic, payload, retain=True)
        if not whole and wider.whole:
            await self.transport.publish(self.topic, b"", retain=True)
        for i in range(chunks, wider.chunks):  # all of them, for a model sent whole
            await self.transport.publish(chunk_topic(self.topic, i), b"", retain=True)
        await self._mark(Published(wider.version, whole, chunks))

    async def _mark(self, mark: Published) -> None:
        if mark == self.mark:
            return
        if self.store is not None:
            await asyncio.to_thread(self.store.mark_published, mark)
        self.mark = mark
