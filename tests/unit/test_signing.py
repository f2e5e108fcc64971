"""Model signatures (Ed25519) and the version rules a child applies to its parent's models."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import numpy as np
import pytest

from edgefl import wire
from edgefl.codecs import encode_params
from edgefl.config import ConfigError
from edgefl.signing import (
    check_model,
    generate_key_pair,
    load_private_key,
    load_public_key,
    sign_model,
    verify_model,
)
from edgefl.wire import Announcement, Delta, Model, Reason, Rejected, TrainConfig


def _model(**overrides: object) -> Model:
    params = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)}
    fields: dict[str, object] = {
        "sender": "gw-1",
        "version": 7,
        "tensors": wire.model_tensors(params),
    }
    fields.update(overrides)
    return Model.model_validate(fields)


def _announcement(**overrides: object) -> Announcement:
    fields: dict[str, object] = {
        "sender": "gw-1",
        "version": 7,
        "round": 3,
        "selected": ["dev-1"],
        "deadline": 1234.5,
        "sent_at": 1204.5,
        "receipts": {"dev-2": (9, 4), "dev-1": (5, 3)},
    }
    fields.update(overrides)
    return Announcement.model_validate(fields)


def _delta(**overrides: object) -> Delta:
    params = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)}
    tensors = encode_params(params, "topk", fraction=0.25)
    return Delta(**{"sender": "gw-1", "version": 7, "base": 6, "tensors": tensors, **overrides})


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return generate_key_pair()


def _reason(model: Model | Announcement | Delta, public: str) -> Reason:
    with pytest.raises(Rejected) as info:
        verify_model(model, load_public_key(public))
    return info.value.reason


def test_a_signed_model_verifies_after_the_wire_round_trip(keys: tuple[str, str]) -> None:
    private, public = keys
    signed = sign_model(_model(), load_private_key(private))
    assert signed.sig is not None and len(signed.sig) == 64
    back = wire.decode_model(wire.encode_model(signed))
    verify_model(back, load_public_key(public))


def test_a_signed_announcement_and_delta_verify_after_the_wire_round_trip(
    keys: tuple[str, str],
) -> None:
    private, public = keys
    announcement = sign_model(_announcement(), load_private_key(private))
    delta = sign_model(_delta(), load_private_key(private))
    assert announcement.sig is not None and delta.sig is not None and len(delta.sig) == 64
    verify_model(
        wire.decode_announcement(wire.encode_announcement(announcement)), load_public_key(public)
    )
    verify_model(wire.decode_delta(wire.encode_delta(delta)), load_public_key(public))


@pytest.mark.parametrize(
    "change",
    [
        {"version": 8},
        {"round": 4},
        {"config": TrainConfig(epochs=100, batch_size=1)},
        {"selected": ["dev-2"]},
        {"deadline": 1234.6},
        {"sent_at": 1204.6},
        {"receipts": {"dev-2": (9, 5), "dev-1": (5, 3)}},
        {"sender": "gw-2"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_tampered_field_fails_the_signature(
    keys: tuple[str, str], change: dict[str, object]
) -> None:
    private, public = keys
    signed = sign_model(_announcement(), load_private_key(private))
    assert _reason(signed.model_copy(update=change), public) is Reason.BAD_SIGNATURE


def test_a_tampered_tensor_fails_the_signature(keys: tuple[str, str]) -> None:
    private, public = keys
    signed = sign_model(_model(), load_private_key(private))
    tensors = [t.model_copy(update={"data": t.data[:-1] + b"\x01"}) for t in signed.tensors]
    assert _reason(signed.model_copy(update={"tensors": tensors}), public) is Reason.BAD_SIGNATURE
    assert _reason(signed.model_copy(update={"version": 8}), public) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("change", ["version", "base", "dtype", "tensor"])
def test_a_tampered_delta_fails_the_signature(keys: tuple[str, str], change: str) -> None:
    private, public = keys
    signed = sign_model(_delta(), load_private_key(private))
    if change == "tensor":
        t = signed.tensors[0]
        tensors = [msgspec.structs.replace(t, q=t.q[:-1] + bytes([t.q[-1] ^ 1]))]
        forged = msgspec.structs.replace(signed, tensors=tensors)
    else:
        forged = msgspec.structs.replace(
            signed, **{change: {"version": 8, "base": 5, "dtype": "f16"}[change]}
        )
    assert _reason(forged, public) is Reason.BAD_SIGNATURE


def test_a_model_signed_with_another_key_or_unsigned_is_refused(keys: tuple[str, str]) -> None:
    _, public = keys
    other_private, _ = generate_key_pair()
    for make in (_model, _announcement, _delta):
        forged = sign_model(make(), load_private_key(other_private))
        assert _reason(forged, public) is Reason.BAD_SIGNATURE
        assert _reason(make(), public) is Reason.BAD_SIGNATURE
        assert _reason(make(sig=b"\x00" * 64), public) is Reason.BAD_SIGNATURE


def test_receipts_in_another_order_keep_the_signature(keys: tuple[str, str]) -> None:
    private, public = keys
    signed = sign_model(_announcement(), load_private_key(private))
    reordered = signed.model_copy(update={"receipts": {"dev-1": (5, 3), "dev-2": (9, 4)}})
    verify_model(reordered, load_public_key(public))


@pytest.mark.parametrize("bad", ["", "ab" * 31, "zz" * 32, "ab" * 33])
def test_a_key_that_is_not_64_hex_digits_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="model_key"):
        load_private_key(bad)
    with pytest.raises(ConfigError, match="parent_key"):
        load_public_key(bad)


# ------------------------------------------------------------------- versions


def _check(
    model: Model | Announcement | Delta,
    *,
    held: int | None,
    public: str | None,
    max_jump: int = 100,
) -> None:
    check_model(
        model, held=held, public=load_public_key(public) if public else None, max_jump=max_jump
    )


def test_a_child_with_a_parent_key_refuses_unsigned_models(keys: tuple[str, str]) -> None:
    for message in (_model(), _announcement(), _delta()):
        with pytest.raises(Rejected) as info:
            _check(message, held=None, public=keys[1])
        assert info.value.reason is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("make", [_model, _announcement], ids=["model", "announcement"])
def test_a_version_below_the_one_held_is_refused_signed_or_not(
    keys: tuple[str, str], make: Callable[..., Model | Announcement]
) -> None:
    private, public = keys
    signed = sign_model(make(version=6), load_private_key(private))
    for model, key in ((signed, public), (make(version=6), None)):
        with pytest.raises(Rejected) as info:
            _check(model, held=7, public=key)
        assert info.value.reason is Reason.VERSION
        _check(model, held=6, public=key)  # the same version again is fine (a re-announce)


@pytest.mark.parametrize("make", [_model, _announcement], ids=["model", "announcement"])
def test_an_unsigned_version_far_ahead_is_refused_but_a_verified_one_is_taken(
    keys: tuple[str, str], make: Callable[..., Model | Announcement]
) -> None:
    private, public = keys
    far = make(version=1007)
    with pytest.raises(Rejected) as info:
        _check(far, held=7, public=None)
    assert info.value.reason is Reason.VERSION
    _check(make(version=107), held=7, public=None)  # exactly max_jump ahead
    _check(sign_model(far, load_private_key(private)), held=7, public=public)
    _check(far, held=None, public=None)  # nothing held yet: nothing to measure from
