"""What a device sends and what it remembers across reboots, as pure functions.

Delta to signed Update bytes (uint8 with error feedback, or float32), the expected
size of that update, and the progress and residual kept in the outbox's state.
No I/O, no asyncio, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgpack
import numpy as np

from ..config import ConfigError, DeviceSettings
from ..params import Params, Spec
from ..quant import ErrorFeedback, float_params, quantize_params
from ..wire import QTensor, Update, encode_update, sign

#: Bytes of an encoded Update besides its tensor payloads: the header, then name,
#: shape, lo and scale per tensor. Only used to judge whether an upload fits a deadline.
UPDATE_HEADER_BYTES = 160
TENSOR_HEADER_BYTES = 64


def expected_update_bytes(spec: Spec, dtype: str = "u8") -> int:
    """Encoded size of an update for ``spec``: within a few percent of the real one."""
    width = 1 if dtype == "u8" else 4
    values = sum(math.prod(shape) for shape in spec.values())
    return values * width + UPDATE_HEADER_BYTES + TENSOR_HEADER_BYTES * len(spec)


def float32_bytes(spec: Spec) -> int:
    """The tensor bytes of the same update in float32: the baseline of ``compression``."""
    return 4 * sum(math.prod(shape) for shape in spec.values())


def hmac_key(hex_key: str | None) -> bytes | None:
    """The update-signing key from its hex form; ``ConfigError`` if it is not hex."""
    if hex_key is None:
        return None
    try:
        key = bytes.fromhex(hex_key)
    except ValueError:
        raise ConfigError("hmac_key: expected an even number of hex digits") from None
    if not key:
        raise ConfigError("hmac_key: empty key")
    return key


def is_finite(params: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(a).all()) for a in params.values())


class UpdateEncoder:
    """Delta -> wire tensors -> signed, encoded Update, keeping the quantization error.

    ``tensors`` runs once per round (the error feedback residual moves on);
    ``encode`` may run again for the same tensors (it only numbers and signs them).
    """

    def __init__(self, settings: DeviceSettings, residual: Params | None = None) -> None:
        self.sender = settings.id
        self.dtype = settings.update_dtype
        self.stochastic = settings.stochastic_rounding
        self.error_feedback = settings.error_feedback and self.dtype == "u8"
        self.seed = settings.seed
        self.key = hmac_key(settings.hmac_key)
        self.feedback = ErrorFeedback(residual if self.error_feedback else None)

    def tensors(self, delta: Params, round_: int) -> list[QTensor]:
        if self.dtype == "f32":
            return float_params(delta)
        rng = np.random.default_rng([self.seed, round_]) if self.stochastic else None
        if not self.error_feedback:
            return quantize_params(delta, stochastic=self.stochastic, rng=rng)
        return self.feedback.quantize(delta, stochastic=self.stochastic, rng=rng)

    def encode(
        self,
        tensors: list[QTensor],
        *,
        seq: int,
        round_: int,
        base: int,
        n: int,
        metrics: Mapping[str, float],
        inc: int = 0,
        low: int = 0,
    ) -> bytes:
        """The signed Update bytes; ``inc`` is the outbox's incarnation, by which a node
        tells this device's seqs from those of an earlier (lost) outbox."""
        update = Update(
            sender=self.sender,
            seq=seq,
            round=round_,
            base=base,
            n=int(n),  # a task may count its samples in a numpy integer
            metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
            tensors=tensors,
            inc=inc,
            low=low,
        )
        return encode_update(sign(update, self.key) if self.key else update)


def pack_params(params: Mapping[str, np.ndarray]) -> bytes:
    """Float32 arrays as msgpack ``{name: [shape, bytes]}`` (the persisted residual)."""
    return msgpack.packb(
        {n: [list(a.shape), np.ascontiguousarray(a, "<f4").tobytes()] for n, a in params.items()},
        use_bin_type=True,
    )


def unpack_params(data: bytes) -> Params:
    obj = msgpack.unpackb(data, raw=False)
    return {
        name: np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
        for name, (shape, raw) in obj.items()
    }


@dataclass
class Progress:
    """What a restarted device must remember, kept under one outbox state key.

    ``trained`` is the last (round, version) trained, ``model_version`` the last
    model seen (for Status), ``residual`` the error feedback carried forward.
    """

    trained: tuple[int, int] | None = None
    model_version: int | None = None
    residual: Params = field(default_factory=dict)

    def dump(self) -> bytes:
        return msgpack.packb(
            {
                "trained": list(self.trained) if self.trained else None,
                "model_version": self.model_version,
                "residual": pack_params(self.residual),
            },
            use_bin_type=True,
        )

    @classmethod
    def load(cls, data: bytes | None) -> Progress:
        if not data:
            return cls()
        doc = msgpack.unpackb(data, raw=False)
        trained = doc.get("trained")
        return cls(
            (int(trained[0]), int(trained[1])) if trained else None,
            doc.get("model_version"),
            unpack_params(doc["residual"]) if doc.get("residual") else {},
        )
