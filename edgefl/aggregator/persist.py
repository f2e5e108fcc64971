"""What a node keeps across a restart: its checkpoint's contents and how it resumes from them.

Pure mapping between a running ``Aggregator`` and ``checkpoint.NodeState``; the node
does the I/O. A checkpoint never holds the open round's updates (the journal does),
and a node never resumes below a version it has published.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..checkpoint import NodeState
from ..params import is_finite, spec_of
from ..robust import NormWindow
from .journal import Key
from .ledger import Ledger
from .rounds import Round
from .sync import ParentSync

if TYPE_CHECKING:
    from .node import Aggregator

log = logging.getLogger(__name__)


def snapshot(node: Aggregator) -> NodeState:
    """The node's state to save: the model and what is settled."""
    ledger = node.gate.ledger
    extra: dict[str, Any] = {
        "aggregations": node.aggregations,
        "last_selected": dict(node.last_selected),
        "children": sorted(node.children.known),
        "ledger": ledger.to_state(),
        "norms": node.norms.values(),
        "declared": dict(node.children.declared),
    }
    if node.link is not None:
        extra["sync"] = node.link.sync.to_extra()
    shared = node.downlink.shared.to_extra()
    if shared is not None:
        extra["shared"] = shared
    return NodeState(
        params=node.params,
        version=node.version,
        round=node.round.number,
        parent_version=node.link.sync.parent_version if node.link is not None else None,
        last_seq=ledger.last_seqs(),
        extra=extra,
    )


def resume(node: Aggregator, state: NodeState | None, published: int = -1) -> int | None:
    """Take ``state`` (None: none that verifies) into ``node``; returns the number of the
    round to open, or None if there was nothing to resume.

    ``published`` is the highest version the node ever published. A fallback to an
    older generation (the newest was damaged), or to none, resumes at the next
    number after it, so that no version ever names two different models.
    """
    if state is not None and spec_of(state.params) != node.spec:
        log.error("%s: checkpoint does not match task %s; starting fresh", node.id, node.task.name)
        state = None
    if state is not None and not is_finite(state.params):
        log.error("%s: checkpoint holds a non-finite model; starting fresh", node.id)
        state = None
    number = None
    if state is not None:
        _take(node, state)
        # A new round identity: the checkpointed one may have been announced and trained.
        number = state.round + 1
    if published > node.version:  # version 0 is init_params(seed): the same every time
        log.warning(
            "%s: v%d was published, the checkpoint has v%d: resuming as v%d",
            node.id,
            published,
            node.version,
            published + 1,
        )
        node.version = published + 1
        number = node.round.number if number is None else number
    if state is not None:
        log.info(
            "%s: resumed from checkpoint at version %d, round %s", node.id, node.version, number
        )
    return number


def _take(node: Aggregator, state: NodeState) -> None:
    node.params = state.params
    node.version = state.version
    extra = state.extra
    node.gate.ledger = Ledger.from_state(
        extra.get("ledger"), state.last_seq, node.settings.max_children
    )
    node.norms = NormWindow(norms=extra.get("norms", []))
    node.children.declared.update({str(k): int(v) for k, v in extra.get("declared", {}).items()})
    node.aggregations = int(extra.get("aggregations", 0))
    node.last_selected = {str(k): int(v) for k, v in extra.get("last_selected", {}).items()}
    node.children.remember(str(c) for c in extra.get("children", []))
    if node.link is not None and "sync" in extra:
        node.link.sync = ParentSync.from_extra(
            extra["sync"], state.parent_version or 0, max_staleness=node.settings.max_staleness
        )
    if "shared" in extra and not node.downlink.shared.restore(extra["shared"], node.spec):
        log.warning("%s: the checkpoint's shared model does not fit; republishing", node.id)


def unsettled(rnd: Round, later: Iterable[Key] = ()) -> list[Key]:
    """Updates admitted and not settled yet: the open round's and those queued for it."""
    queued = [ok.update for ok in (*rnd.waiting.values(), *rnd.carry.values())]
    return [*rnd.taken, *((u.sender, u.inc, u.seq) for u in queued), *later]
