"""A node's side of the sync with its parent: what the parent has receipted, and adoption.

Pure: builds the sync Update, reads the parent's receipts and rebases on a parent
model; the shell stores and publishes the encoded update. No I/O here. It must
never move its reference past work the parent has not receipted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .. import codecs
from ..params import Params, add, copy, from_bytes, subtract, to_bytes
from ..wire import Update, decode_update

#: What a parent Model says about the sync in flight (see ``ParentSync.on_parent``).
Verdict = Literal["none", "confirmed", "refused", "resend", "wait"]


@dataclass
class Inflight:
    """The sync sent and not yet receipted: resent as is until the parent settles it."""

    seq: int
    base: int
    n: int
    rounds: int
    payload: bytes
    #: what the parent folds: the sync's tensors as the parent dequantizes them.
    delta: Params
    #: the parent's version when it was last sent; None: resent at a restart.
    sent_at: int | None = None


@dataclass
class ParentSync:
    """Sync bookkeeping of a node with a parent.

    ``reference`` is the model the parent accounts for: the parent model last
    adopted, moved forward by every sync the parent has *receipted* since, by the
    delta as the parent received it. The next sync sends ``model - reference``, so
    it carries every piece of work not receipted yet (the quantization error of
    earlier syncs included: that is the error feedback). One sync is in flight at a
    time: the next is built only once the parent has receipted or refused it, so
    unreceipted work is never in two syncs. ``max_staleness`` is the parent's (the
    tiers share it): a sync more than that behind the parent's version is refused.
    """

    reference: Params
    parent_version: int
    max_staleness: int = 4
    inc: int = 0
    inflight: Inflight | None = None
    rounds_since_sync: int = 0
    samples_since_sync: int = 0
    syncs: int = 0
    #: the parent's (version, round, deadline) of the last model seen: its announcement.
    seen: tuple[int, int, float] | None = None

    def after_round(self, samples: int) -> None:
        self.rounds_since_sync += 1
        self.samples_since_sync += samples

    def due(self, sync_every: int) -> bool:
        return (
            self.inflight is None
            and self.rounds_since_sync >= sync_every
            and self.samples_since_sync > 0
        )

    def build(
        self,
        params: Mapping[str, np.ndarray],
        *,
        sender: str,
        seq: int,
        round: int,
        codec: str = "u8",
        fraction: float = 1.0,
    ) -> Update:
        """The sync Update for ``seq``: all unreceipted work through ``codec`` (a registered
        name; ``fraction`` for a sparse one); then ``sent`` it."""
        delta = subtract(params, self.reference)
        tensors = codecs.encode_params(delta, codec, fraction=fraction)
        return Update(
            sender=sender,
            seq=seq,
            round=round,
            base=self.parent_version,
            n=max(1, self.samples_since_sync),
            tensors=tensors,
            inc=self.inc,
            low=seq,  # one sync in flight: every earlier one is settled or merged into this
        )

    def sent(self, update: Update, payload: bytes) -> None:
        """``update`` (encoded as ``payload``) is on its way: in flight until receipted."""
        self.inflight = Inflight(
            seq=update.seq,
            base=update.base,
            n=update.n,
            rounds=self.rounds_since_sync,
            payload=payload,
            delta=codecs.decode_params(update.tensors),
            sent_at=self.seen[0] if self.seen is not None else None,
        )
        self.rounds_since_sync = 0
        self.samples_since_sync = 0
        self.syncs += 1

    def on_parent(
        self, version: int, round: int, receipt: tuple[int, int] | None, deadline: float = 0.0
    ) -> Verdict:
        """Read a (checked) parent Model: its version, round, deadline and receipt for us.

        - ``confirmed``: the receipt covers the sync's seq. The parent folded it into
          a round it saved before publishing this model, so every model from this one
          on holds it: the reference moves by its delta. The receipt decides, so a
          sync folded but whose receipt came late is counted once.
        - ``refused``: not covered and ``version - base > max_staleness``: the parent
          folds an update only while it is at most that stale, so it never will. Its
          work, samples and rounds go back into the next sync.
        - ``resend``: not covered, and the parent may have lost it: the same version
          was announced anew (another round or deadline: a restart, or a round
          re-announced empty), or two versions closed since it was sent. A seq the
          parent holds already is dropped there as a redelivery.
        - ``wait``: not covered yet (it may be in the parent's open round); ``none``:
          nothing in flight.
        """
        seen, self.seen = self.seen, (version, round, deadline)
        sync = self.inflight
        if sync is None:
            return "none"
        if receipt is not None and receipt[0] == self.inc and receipt[1] >= sync.seq:
            self.reference = add(self.reference, sync.delta)
            self.inflight = None
            return "confirmed"
        if version - sync.base > self.max_staleness:
            self.rounds_since_sync += sync.rounds
            self.samples_since_sync += sync.n
            self.inflight = None
            return "refused"
        if sync.sent_at is None:  # resent at a restart: count from the first model seen
            sync.sent_at = version
            return "wait"
        anew = seen is not None and seen[0] == version and seen != self.seen
        if anew or version >= sync.sent_at + 2:
            sync.sent_at = version
            return "resend"
        return "wait"

    def adopt(
        self, params: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], version: int
    ) -> Params:
        """Rebase on the parent's ``params`` at ``version``; returns the node's new model.

        The work the parent has not receipted (``current - reference``, the sync in
        flight included) is carried over onto the parent model: what this parent
        model holds of ours is exactly what it receipted.
        """
        unsent = subtract(current, self.reference)
        model = {n: np.add(a, unsent[n], dtype=np.float32) for n, a in params.items()}
        self.reference = copy(params)
        self.parent_version = version
        return model

    # ---------------------------------------------------------- checkpointing
    def to_extra(self) -> dict[str, Any]:
        sync = self.inflight
        return {
            "reference": to_bytes(self.reference),
            "parent_version": self.parent_version,
            "rounds_since_sync": self.rounds_since_sync,
            "samples_since_sync": self.samples_since_sync,
            "syncs": self.syncs,
            "inflight": None
            if sync is None
            else {"seq": sync.seq, "n": sync.n, "rounds": sync.rounds, "payload": sync.payload},
        }

    @classmethod
    def from_extra(
        cls, extra: Mapping[str, Any], parent_version: int, *, max_staleness: int = 4
    ) -> ParentSync:
        reference = from_bytes(extra["reference"])
        sync = cls(
            reference=reference,
            parent_version=parent_version,
            max_staleness=max_staleness,
            rounds_since_sync=int(extra.get("rounds_since_sync", 0)),
            samples_since_sync=int(extra.get("samples_since_sync", 0)),
            syncs=int(extra.get("syncs", 0)),
        )
        flight = extra.get("inflight")
        if flight:
            payload = bytes(flight["payload"])
            update = decode_update(payload, max_bytes=len(payload))
            sync.inflight = Inflight(
                seq=int(flight["seq"]),
                base=update.base,
                n=int(flight["n"]),
                rounds=int(flight["rounds"]),
                payload=payload,
                delta=codecs.decode_params(update.tensors),
            )
        return sync
