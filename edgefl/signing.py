"""Model authenticity: Ed25519 keys, model signatures, and the checks a child makes on a model.

A node signs every Announcement, Delta and Model it publishes; its children verify
them under the node's public key and refuse versions that go back or leap ahead. Pure functions over
wire objects and hex strings: no files, no network, no clock.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .config import ConfigError
from .wire import Announcement, Delta, Model, Reason, Rejected, pack_map

#: What a node signs for its children.
Signed = TypeVar("Signed", Model, Announcement, Delta)

#: An Ed25519 key, private or public, is 32 bytes: 64 hex digits.
KEY_HEX_DIGITS = 64


log = logging.getLogger(__name__)
_warned_unsigned: set[str] = set()


def warn_unsigned(child: str, parent: str) -> None:
    """One WARNING per process that a child takes unsigned models (a simulator runs
    thousands of children in one process: the first says it for all)."""
    if not _warned_unsigned:
        _warned_unsigned.add(child)
        log.warning(
            "%s: no parent_key: unsigned models from %s are taken (logged once)", child, parent
        )


def generate_key_pair() -> tuple[str, str]:
    """A fresh ``(private, public)`` Ed25519 key pair, each as 64 hex digits."""
    private = Ed25519PrivateKey.generate()
    return private.private_bytes_raw().hex(), public_hex(private)


def load_private_key(hex_key: str, what: str = "model_key") -> Ed25519PrivateKey:
    """The signing key from its hex form; ``ConfigError`` naming ``what`` if it is not one."""
    return Ed25519PrivateKey.from_private_bytes(_key_bytes(hex_key, what))


def load_public_key(hex_key: str, what: str = "parent_key") -> Ed25519PublicKey:
    """The verifying key from its hex form; ``ConfigError`` naming ``what`` if it is not one."""
    try:
        return Ed25519PublicKey.from_public_bytes(_key_bytes(hex_key, what))
    except ValueError:
        raise ConfigError(f"{what}: not an Ed25519 public key") from None


def public_hex(private: Ed25519PrivateKey) -> str:
    """The hex public key that verifies what ``private`` signs."""
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def signed_body(message: Model | Announcement | Delta) -> bytes:
    """Canonical bytes a signature covers: every field but ``sig``, maps keys sorted."""
    if isinstance(message, Delta):
        fields = msgspec.to_builtins(message)
        fields.pop("sig", None)
    else:
        fields = message.model_dump(exclude={"sig"})
    return pack_map(_canonical(fields))


def sign_model(message: Signed, private: Ed25519PrivateKey) -> Signed:
    """``message`` with ``sig`` = the Ed25519 signature of its other fields."""
    sig = private.sign(signed_body(message))
    if isinstance(message, Delta):
        return msgspec.structs.replace(message, sig=sig)
    return message.model_copy(update={"sig": sig})


def verify_model(message: Model | Announcement | Delta, public: Ed25519PublicKey) -> None:
    """Raise ``Rejected(bad_signature)`` unless ``message.sig`` verifies under ``public``."""
    if message.sig is None:
        raise Rejected(Reason.BAD_SIGNATURE, f"unsigned {type(message).__name__.lower()}")
    try:
        public.verify(message.sig, signed_body(message))
    except InvalidSignature:
        raise Rejected(Reason.BAD_SIGNATURE, "model signature mismatch") from None


def check_model(
    model: Model | Announcement | Delta,
    *,
    held: int | None,
    public: Ed25519PublicKey | None,
    max_jump: int,
) -> None:
    """What a child checks before it takes a parent's model or round; raises ``Rejected``.

    With ``public`` the model must be signed under it. Its version may never be below
    ``held`` (the version the child holds; None: nothing yet). An unverified model may
    also not be more than ``max_jump`` versions ahead of it: anyone who can publish on
    the topic could otherwise leave the child behind a forged future version. A verified
    one may jump any distance (the parent moved on while the child was away).
    """
    if public is not None:
        verify_model(model, public)
    if held is None:
        return
    if model.version < held:
        raise Rejected(Reason.VERSION, f"version {model.version} is below v{held} held")
    if public is None and model.version - held > max_jump:
        raise Rejected(
            Reason.VERSION,
            f"unsigned version {model.version} is more than {max_jump} ahead of v{held}",
        )


def _key_bytes(hex_key: str, what: str) -> bytes:
    if len(hex_key) != KEY_HEX_DIGITS:
        raise ConfigError(f"{what}: expected {KEY_HEX_DIGITS} hex digits, got {len(hex_key)}")
    try:
        return bytes.fromhex(hex_key)
    except ValueError:
        raise ConfigError(f"{what}: not hex") from None


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value
