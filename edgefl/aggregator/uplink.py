"""A node's side of the sync with its parent: what it has sent, and adopting new versions.

Pure: builds the sync Update and rebases on a parent model; the shell stores the
encoded update in the durable outbox and publishes it. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..params import Params, copy, subtract
from ..quant import ErrorFeedback, float_params
from ..wire import Update


@dataclass
class Uplink:
    """Sync bookkeeping of a node with a parent.

    ``reference`` is the model the parent already accounts for: the parent model
    last adopted, moved forward by every delta sent since. Each sync sends
    ``model - reference`` (only the work the parent has not seen, so two syncs
    against the same parent version never count the same rounds twice), with
    ``n`` the samples folded since the previous sync.
    """

    reference: Params
    parent_version: int
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)
    rounds_since_sync: int = 0
    samples_since_sync: int = 0
    syncs: int = 0

    def after_round(self, samples: int) -> None:
        self.rounds_since_sync += 1
        self.samples_since_sync += samples

    def due(self, sync_every: int) -> bool:
        return self.rounds_since_sync >= sync_every and self.samples_since_sync > 0

    def build(
        self,
        params: Mapping[str, np.ndarray],
        *,
        sender: str,
        seq: int,
        round: int,
        dtype: Literal["u8", "f32"] = "u8",
    ) -> Update:
        """The sync Update for ``seq``; call ``sent`` once it is safely stored."""
        delta = subtract(params, self.reference)
        tensors = self.feedback.quantize(delta) if dtype == "u8" else float_params(delta)
        return Update(
            sender=sender,
            seq=seq,
            round=round,
            base=self.parent_version,
            n=max(1, self.samples_since_sync),
            tensors=tensors,
        )

    def sent(self, params: Mapping[str, np.ndarray]) -> None:
        """The update built from ``params`` is stored: the parent will account for it."""
        self.reference = copy(params)
        self.rounds_since_sync = 0
        self.samples_since_sync = 0
        self.syncs += 1

    def adopt(
        self, params: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], version: int
    ) -> Params:
        """Rebase on the parent's ``params`` at ``version``; returns the node's new model.

        The node's unsent work (``current - reference``) is carried over onto the
        parent model, so adopting mid-way between two syncs loses nothing. Right
        after a sync that work is zero and the node takes the parent model as is.
        """
        unsent = subtract(current, self.reference)
        model = {n: np.add(a, unsent[n], dtype=np.float32) for n, a in params.items()}
        self.reference = copy(params)
        self.parent_version = version
        return model

    # ---------------------------------------------------------- checkpointing
    def to_extra(self) -> dict[str, Any]:
        return {
            "reference": _pack(self.reference),
            "residual": _pack(self.feedback.residual),
            "parent_version": self.parent_version,
            "rounds_since_sync": self.rounds_since_sync,
            "samples_since_sync": self.samples_since_sync,
            "syncs": self.syncs,
        }

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any], parent_version: int) -> Uplink:
        return cls(
            reference=_unpack(extra["reference"]),
            parent_version=parent_version,
            feedback=ErrorFeedback(_unpack(extra.get("residual", {}))),
            rounds_since_sync=int(extra.get("rounds_since_sync", 0)),
            samples_since_sync=int(extra.get("samples_since_sync", 0)),
            syncs=int(extra.get("syncs", 0)),
        )


def _pack(params: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {
        n: {"shape": list(a.shape), "data": np.ascontiguousarray(a, "<f4").tobytes()}
        for n, a in params.items()
    }


def _unpack(packed: Mapping[str, Any]) -> Params:
    return {
        n: np.frombuffer(t["data"], dtype="<f4").astype(np.float32).reshape(t["shape"])
        for n, t in packed.items()
    }
