"""The downlink: deltas keep node and child bit-identical; a child fetches what it lacks."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.downlink import Follower, Shared
from edgefl.fetch import ModelFeed
from edgefl.signing import sign_model
from edgefl.topics import Topics
from edgefl.wire import (
    Announcement,
    Model,
    encode_announcement,
    encode_delta,
    encode_model,
    model_tensors,
)

T = Topics()
SPEC = {"w": (16, 8), "b": (8,)}


def _walk(spec: dict[str, tuple[int, ...]] = SPEC, n: int = 50) -> list[dict[str, np.ndarray]]:
    """A node's model over ``n + 1`` versions: a random walk, as training moves it."""
    rng = np.random.default_rng(0)
    params = {n: rng.normal(size=s).astype(np.float32) for n, s in spec.items()}
    out = [params]
    for _ in range(n):
        params = {
            n: (a + rng.normal(scale=0.02, size=a.shape)).astype(np.float32)
            for n, a in params.items()
        }
        out.append(params)
    return out


def _whole(shared: Shared, key: Ed25519PrivateKey | None = None) -> bytes:
    assert shared.held is not None and shared.version is not None
    model = Model(
        sender="gw", version=shared.version, tensors=model_tensors(shared.held, shared.dtype)
    )
    return encode_model(sign_model(model, key) if key else model)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[n].tobytes() == b[n].tobytes() for n in a)


@pytest.mark.parametrize(
    ("codec", "fraction", "dtype"), [("u8", 1.0, "f32"), ("topk", 0.1, "f32"), ("u8", 1.0, "f16")]
)
def test_deltas_keep_node_and_children_bit_identical_over_50_versions(
    codec: str, fraction: float, dtype: str
) -> None:
    shared = Shared("gw", dtype, codec, fraction)  # type: ignore[arg-type]
    steady = ModelFeed(T, "gw", spec=SPEC, public=None, max_jump=100)
    away = ModelFeed(T, "gw", spec=SPEC, public=None, max_jump=100)
    walk = _walk()
    assert shared.move(walk[0], 0) is None  # the first version has nothing to go from
    assert steady.on_message(T.model("gw"), _whole(shared)) is True
    assert away.on_message(T.model("gw"), _whole(shared)) is True
    for version in range(1, 51):
        delta = shared.move(walk[version], version)
        assert delta is not None and delta.base == version - 1
        payload = encode_delta(delta)
        assert steady.on_message(T.delta("gw"), payload) is True
        if not 20 <= version < 25:  # away for five versions
            caught_up = away.on_message(T.delta("gw"), payload)
            if version == 25:  # the delta does not start from what it holds
                assert caught_up is False and away.gaps == 1
                assert set(T.model_filters("gw")) <= away.wanted(25)  # fetched whole
                assert away.on_message(T.model("gw"), _whole(shared)) is True
        assert shared.held is not None
        assert steady.held is not None and _same(steady.held, shared.held), version
        assert steady.version == version
    assert away.held is not None and _same(away.held, shared.held)
    # Error feedback: the shared model follows the node's within one step, not drifting.
    assert shared.held is not None
    err = max(float(np.abs(walk[50][n] - shared.held[n]).max()) for n in SPEC)
    assert err < 0.3 if codec == "topk" else err < 0.01


def test_a_delta_is_far_smaller_than_the_whole_model() -> None:
    shared = Shared("gw", "f32", "topk", 0.1)
    walk = _walk({"w": (256, 64)}, 1)
    shared.move(walk[0], 0)
    delta = shared.move(walk[1], 1)
    assert delta is not None
    assert len(encode_delta(delta)) * 15 < len(_whole(shared))  # 2 bytes per kept value


def test_a_forged_or_out_of_order_delta_is_refused_and_counted() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    shared = Shared("gw")
    walk = _walk()
    shared.move(walk[0], 0)
    feed = ModelFeed(T, "gw", spec=SPEC, public=key.public_key(), max_jump=3)
    assert feed.on_message(T.model("gw"), _whole(shared, key)) is True
    delta1 = shared.move(walk[1], 1)
    delta2 = shared.move(walk[2], 2)
    assert delta1 is not None and delta2 is not None
    assert feed.on_message(T.delta("gw"), encode_delta(sign_model(delta1, other))) is False
    assert feed.on_message(T.delta("gw"), encode_delta(delta1)) is False  # unsigned
    assert feed.ignored["bad_signature"] == 2 and feed.version == 0
    assert feed.on_message(T.delta("gw"), encode_delta(sign_model(delta2, key))) is False
    assert feed.gaps == 1 and feed.version == 0  # out of order: not applied
    assert feed.on_message(T.delta("gw"), encode_delta(sign_model(delta1, key))) is True
    assert feed.on_message(T.delta("gw"), encode_delta(sign_model(delta2, key))) is True
    assert feed.version == 2 and shared.held is not None and feed.held is not None
    assert _same(feed.held, shared.held)
    old = Announcement(sender="gw", version=1, round=9)
    assert feed.on_message(T.round("gw"), encode_announcement(sign_model(old, key))) is False
    assert feed.ignored["version"] == 1  # an announcement never goes back


def test_a_child_asks_for_the_delta_only_from_the_version_before() -> None:
    follower = Follower()
    assert follower.need(3) == "model"
    follower.held, follower.version = {"b": np.zeros(8, np.float32)}, 2
    assert (follower.need(2), follower.need(3), follower.need(5)) == ("none", "delta", "delta")
    # with the announced base of the retained delta: only a delta from what is held
    assert (follower.need(5, base=2), follower.need(5, base=4)) == ("delta", "model")
    feed = ModelFeed(T, "gw", spec=SPEC, public=None, max_jump=100)
    assert feed.wanted(None) == {T.round("gw")}
    assert feed.wanted(0) == {T.round("gw"), *T.model_filters("gw")}
    gateway = ModelFeed(T, "cloud", spec=SPEC, public=None, max_jump=100, always_delta=True)
    assert gateway.wanted(None) == {T.round("cloud"), T.delta("cloud")}


def test_a_child_that_lacks_the_announced_delta_base_fetches_the_whole_model_at_once() -> None:
    feed = ModelFeed(T, "gw", spec=SPEC, public=None, max_jump=100)
    feed.follower.held, feed.follower.version = {"b": np.zeros(8, np.float32)}, 2
    delta = {T.round("gw"), T.delta("gw")}
    whole = {T.round("gw"), *T.model_filters("gw")}
    for version, base, wanted in ((3, 2, delta), (5, 4, whole), (6, 2, delta), (7, None, delta)):
        announcement = Announcement(sender="gw", version=version, base=base, round=version)
        assert feed.on_message(T.round("gw"), encode_announcement(announcement))
        # base 2 (held): the delta; base 4: it would not apply, so the whole model now;
        # a version skipped (6 from 2) is still one delta; no base known: try the delta
        assert feed.wanted(version) == wanted, version
