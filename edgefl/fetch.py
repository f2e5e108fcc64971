"""A child's side of the downlink: read the announcements, fetch the model only when needed.

Every child reads its parent's ``round`` topic. A device that trains the round,
and a gateway (which adopts every version), subscribes to the ``delta`` topic to
move from the version it holds to the next; without that version (it joined late,
missed versions, restarted) it subscribes to the retained whole ``model`` until it
holds it. Everything is checked (signature, versions, shapes) and refusals counted.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .downlink import Follower
from .errors import Reason, Rejected
from .params import Params, is_finite
from .signing import check_model
from .topics import Topics
from .transport import AnyTransport
from .wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Announcement,
    Delta,
    Model,
    decode_announcement,
    decode_delta,
    decode_model,
)

log = logging.getLogger(__name__)

#: How long a child waits for the delta it needs before it fetches the whole model.
DELTA_WAIT_S = 2.0


class ModelFeed:
    """The parent's announcements and models as one child receives them.

    ``on_message`` takes a message from the parent's topics and returns what it
    brought: an accepted Announcement, or True when ``held`` moved to a new version.
    ``refresh`` subscribes to what the version wanted needs and drops the rest.
    """

    def __init__(
        self,
        topics: Topics,
        parent: str,
        *,
        spec: Mapping[str, tuple[int, ...]],
        public: Ed25519PublicKey | None,
        max_jump: int,
        max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        always_delta: bool = False,
        floor: int | None = None,
        on_refuse: Callable[[Rejected], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.parent = parent
        self.spec = dict(spec)
        self.public = public
        self.max_jump = max_jump
        self.max_bytes = max_bytes
        #: a gateway adopts every version: it keeps the delta topic subscribed
        self.always_delta = always_delta
        self.follower = Follower()
        #: the highest version accepted (an announcement's or a model's): never lower
        self.seen: int | None = floor
        #: the version the child held when it started (its progress, its checkpoint)
        self.floor = floor
        #: the parent's latest whole model does not fit our task (another model or option)
        self.mismatch = False
        #: deltas that did not start from the version held (missed versions)
        self.gaps = 0
        self.ignored: Counter[str] = Counter()
        self._on_refuse = on_refuse
        self.subscribed: set[str] = set()
        self.clock = clock
        #: the version a delta is awaited for, and since when
        self._delta_for: tuple[int, float] | None = None
        #: the latest announcement's (version, base of its retained delta)
        self._announced: tuple[int, int | None] | None = None
        self._round = topics.round(parent)
        self._delta = topics.delta(parent)
        self._model = topics.model(parent)

    @property
    def version(self) -> int | None:
        return self.follower.version

    @property
    def held(self) -> Params | None:
        return self.follower.held

    def need(self, version: int) -> str:
        return self.follower.need(version, self._base_of(version))

    def _base_of(self, version: int) -> int | None:
        """The base of the retained delta to ``version``, if its announcement named one."""
        announced = self._announced
        return announced[1] if announced is not None and announced[0] == version else None

    def base_topics(self) -> set[str]:
        """What a child is always subscribed to."""
        return {self._round, self._delta} if self.always_delta else {self._round}

    def wanted(self, version: int | None) -> set[str]:
        """The topics to hold ``version`` (None: no need for a model now).

        A delta that does not come within ``DELTA_WAIT_S`` (the node restarted and sent
        that version whole, or the delta went missing) gives way to the whole model.
        """
        out = self.base_topics()
        need = "none" if version is None else self.need(version)
        if need == "delta" and version is not None:
            if self._delta_for is None or self._delta_for[0] != version:
                self._delta_for = (version, self.clock())
            elif self.clock() - self._delta_for[1] > DELTA_WAIT_S:
                need = "model"
        if need == "delta":
            out.add(self._delta)
        elif need == "model":
            out.update(self.topics.model_filters(self.parent))
        return out

    async def refresh(self, transport: AnyTransport, version: int | None) -> None:
        """Subscribe to what ``version`` needs, unsubscribe from what it does not."""
        wanted = self.wanted(version)
        for topic in sorted(self.subscribed - wanted):
            await transport.unsubscribe(topic)
        for topic in sorted(wanted - self.subscribed):
            await transport.subscribe(topic)  # a retained model arrives with the SUBACK
        self.subscribed = wanted

    def on_message(self, topic: str, payload: bytes) -> Announcement | bool:
        """An accepted Announcement, or whether the model held moved; refusals counted."""
        if not payload:
            return False  # a retained topic being cleared
        try:
            if topic == self._round:
                announcement = decode_announcement(payload)
                self._check(announcement, self.seen)
                self.seen = max(self.seen or 0, announcement.version)
                self._announced = (announcement.version, announcement.base)
                return announcement
            if topic == self._delta:
                delta = decode_delta(payload, self.spec, max_bytes=self.max_bytes)
                if self.follower.held is None or delta.base != self.follower.version:
                    self.gaps += 1  # not from what we hold: the whole model is fetched instead
                    self._delta_for = (delta.version, -math.inf)  # fetch it whole at once
                    return False
                self._check(delta, self.follower.version)
                params = self.follower.take_delta(delta)
            elif topic == self._model:
                model = decode_model(payload, max_bytes=self.max_bytes)
                self.mismatch = {t.name: tuple(t.shape) for t in model.tensors} != self.spec
                if self.mismatch:
                    raise Rejected(Reason.SHAPE, "it does not fit this task: model_mismatch")
                if self.follower.version is not None and model.version <= self.follower.version:
                    return False  # the retained copy of what we hold already
                self._check(model, self.follower.version if self.held else self.floor)
                params = self.follower.take_model(model)
            else:
                return False
            if not is_finite(params):  # a signed model cannot be; an unsigned one might
                self.follower.held, self.follower.version = None, None
                raise Rejected(Reason.NONFINITE, "parent model is not finite")
        except Rejected as exc:
            self.refuse(exc)
            return False
        self.seen = max(self.seen or 0, self.follower.version or 0)
        return True

    def refuse(self, exc: Rejected) -> None:
        if not self.ignored[exc.reason.value]:
            log.warning("ignoring a bad message from %s: %s (logged once)", self.parent, exc)
        self.ignored[exc.reason.value] += 1
        if self._on_refuse is not None:
            self._on_refuse(exc)

    def _check(self, message: Announcement | Delta | Model, held: int | None) -> None:
        check_model(
            message,
            held=held,
            public=self.public,
            max_jump=self.max_jump,
        )
