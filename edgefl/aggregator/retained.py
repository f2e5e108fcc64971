"""A node's retained downlink on the broker: announcement, delta, and the whole model.

The whole model is in one form at a time, one model per version.

Before a model goes out, the highest version published and the retained topics it
may leave behind are marked durably (``checkpoint.Published``); once it is out, the
other form's leftovers are cleared: the whole model when it travels in chunks, the
chunk sub-topics when it travels whole. It never lowers the mark.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..checkpoint import CheckpointStore, Published
from ..downlink import Shared
from ..params import Params
from ..signing import sign_model
from ..topics import Topics
from ..transport import AnyTransport, chunk_topic, split
from ..wire import Model, encode_delta, encode_model, model_tensors


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


class Downlink:
    """What a node publishes to its children, all retained: for each new version the
    delta from the one before (``Shared``) and the whole model, then each round's
    announcement. A version's payloads are made once and sent again as they are
    until they are out, so the shared model moves once per version."""

    def __init__(
        self,
        transport: AnyTransport,
        topics: Topics,
        node: str,
        max_message_bytes: int,
        shared: Shared,
        whole: Literal["exact", "u8"] = "exact",
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.node = node
        self.shared = shared
        #: the whole model as held (bit-identical), or in uint8 (a quarter of float32)
        self.whole = whole
        self.model = RetainedModel(transport, topics.model(node), max_message_bytes)
        #: the version published in full (delta and whole model); None: none yet
        self.version: int | None = None
        #: the version its retained delta starts from; None: not known (a restart that
        #: publishes its version again leaves the earlier delta) or no delta
        self.base: int | None = None
        self._made: tuple[int, bytes | None, bytes] | None = None
        #: bytes of the last delta and whole model published
        self.delta_bytes = 0
        self.model_bytes = 0

    async def publish_version(
        self, params: Params, version: int, key: Ed25519PrivateKey | None
    ) -> None:
        """Move the shared model to ``version`` and publish its delta and whole model."""
        if self._made is None or self._made[0] != version:
            again = self.shared.version == version  # restarted there: the delta is retained
            delta = self.shared.move(params, version)
            held = self.shared.held
            assert held is not None
            dtype = self.shared.dtype if self.whole == "exact" else "u8"
            model = Model(sender=self.node, version=version, tensors=model_tensors(held, dtype))
            if key is not None:
                model = sign_model(model, key)
                delta = sign_model(delta, key) if delta is not None else None
            self._made = (
                version,
                None if again else b"" if delta is None else encode_delta(delta),
                encode_model(model),
            )
            self.base = None if again or delta is None else delta.base
        _, delta_payload, model_payload = self._made
        # The delta first: a child that reads the announcement finds what it points to.
        if delta_payload is not None:
            await self.transport.publish(self.topics.delta(self.node), delta_payload, retain=True)
        await self.model.publish(model_payload, version)
        self.version = version
        self.delta_bytes, self.model_bytes = len(delta_payload or b""), len(model_payload)

    async def announce(self, payload: bytes) -> None:
        await self.transport.publish(self.topics.round(self.node), payload, retain=True)
