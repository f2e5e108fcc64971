"""Bytes on the wire per parameter, and codec cost: uint8 and top-k deltas vs float32.

Run: python bench/bench_wire.py
Every figure is printed beside its reference measured in the same run.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from edgefl import codecs, fedavg, wire
from edgefl.tasks import set_torch_threads


def _delta(params: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # A realistic layer mix: most parameters in a few matrices, a few small biases.
    rows = params // 1000
    return {
        "fc1.weight": rng.normal(0, 0.01, (rows - 1, 1000)).astype(np.float32),
        "fc1.bias": rng.normal(0, 0.01, 500).astype(np.float32),
        "fc2.weight": rng.normal(0, 0.01, (10, 50)).astype(np.float32),
    }


def _update(tensors: list[wire.QTensor]) -> wire.Update:
    return wire.Update(sender="dev-1", seq=1, round=1, base=1, n=100, tensors=tensors)


def encode_u8(delta: dict[str, np.ndarray]) -> bytes:
    return wire.encode_update(_update(codecs.encode_params(delta)))


def encode_f32(delta: dict[str, np.ndarray]) -> bytes:
    return wire.encode_update(_update(codecs.encode_params(delta, "f32")))


def torch_save(delta: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in delta.items()}, buf)
    return buf.getvalue()


def decode_fold(data: bytes, spec: dict[str, tuple[int, ...]], acc: fedavg.Aggregate) -> None:
    """What an aggregator does per received update: decode, check, fold into its round."""
    update = wire.decode_update(data, spec)
    acc.add_quantized(update.tensors, float(update.n))


def best_us(fn: Callable[[], object], repeat: int) -> float:
    """Best of ``repeat`` runs, in microseconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e6


def median_us(fn: Callable[[], object], repeat: int) -> float:
    """Median of ``repeat`` runs, in microseconds (the machine is shared: medians)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


#: The codecs compared per update, with the share of values kept.
CODECS = (("topk", 0.1), ("u8", 1.0), ("f32", 1.0))


def codec_table() -> bool:
    """Encode (with error feedback, as a device does) and decode-fold per update, and the
    bytes of each, top-k at k = n/10 beside uint8 and float32 measured in the same run."""
    print("\ncodecs per update: encode with error feedback, decode + check + fold (median us)")
    print("target: topk at 0.1 sends >= 10x fewer bytes than float32")
    print(
        f"{'params':>10} {'codec':>6} {'bytes':>10} {'f32/bytes':>10} "
        f"{'encode':>9} {'decode+fold':>12} {'enc/u8':>7} {'dec/u8':>7}"
    )
    ok = True
    for n in (100_000, 1_000_000):
        delta = _delta(n, seed=2)
        spec = {k: v.shape for k, v in delta.items()}
        repeat = 15 if n <= 100_000 else 5
        rows = {}
        for codec, fraction in CODECS:
            feedback = codecs.ErrorFeedback()

            def encode(
                c: str = codec,
                f: float = fraction,
                fb: codecs.ErrorFeedback = feedback,
                d: dict[str, np.ndarray] = delta,
            ) -> bytes:
                return wire.encode_update(_update(fb.encode(d, c, fraction=f)))

            data = encode()
            acc = fedavg.StreamingAverage()
            enc = median_us(encode, repeat)
            dec = median_us(lambda b=data, a=acc, s=spec: decode_fold(b, s, a), repeat)
            rows[codec] = (len(data), enc, dec)
        f32_bytes = rows["f32"][0]
        for codec, _ in CODECS:
            size, enc, dec = rows[codec]
            print(
                f"{n:>10,} {codec:>6} {size:>10,} {f32_bytes / size:>9.1f}x {enc:>9.0f} "
                f"{dec:>12.0f} {enc / rows['u8'][1]:>6.2f}x {dec / rows['u8'][2]:>6.2f}x"
            )
        ok &= f32_bytes / rows["topk"][0] >= 10
    print(f"{'PASS' if ok else 'FAIL'}  topk (k = n/10) >= 10x fewer bytes than float32")
    return ok


def main() -> int:
    set_torch_threads(1)  # as an aggregator process runs its fold
    ok = True
    print("bytes on the wire per parameter (target: uint8 <= 1.01 at 100k+ parameters)")
    print(f"{'params':>10} {'uint8':>8} {'float32':>8} {'torch.save':>11} {'ratio f32/u8':>13}")
    for n in (100_000, 1_000_000):
        delta = _delta(n)
        count = sum(a.size for a in delta.values())
        u8, f32, ts = (len(f(delta)) / count for f in (encode_u8, encode_f32, torch_save))
        ok &= u8 <= 1.01
        print(f"{count:>10,} {u8:>8.4f} {f32:>8.4f} {ts:>11.4f} {f32 / u8:>12.2f}x")

    verdicts: list[tuple[int, str, bool]] = []
    print("\ncodec cost per update, microseconds (target: uint8 path not slower than float32)")
    print(f"{'params':>10} {'step':>8} {'uint8':>10} {'float32':>10} {'u8/f32':>8}")
    for n in (100_000, 1_000_000):
        delta = _delta(n, seed=1)
        spec = {k: v.shape for k, v in delta.items()}
        repeat = 30 if n <= 100_000 else 10
        u8_bytes, f32_bytes = encode_u8(delta), encode_f32(delta)
        enc = (
            best_us(lambda d=delta: encode_u8(d), repeat),
            best_us(lambda d=delta: encode_f32(d), repeat),
        )
        # One accumulator per codec, as in a round: its buffers are allocated once.
        acc_u8, acc_f32 = fedavg.StreamingAverage(), fedavg.StreamingAverage()
        dec = (
            best_us(lambda b=u8_bytes, s=spec, a=acc_u8: decode_fold(b, s, a), repeat),
            best_us(lambda b=f32_bytes, s=spec, a=acc_f32: decode_fold(b, s, a), repeat),
        )
        total_u8, total_f32 = enc[0] + dec[0], enc[1] + dec[1]
        for step, (a, b) in (("encode", enc), ("decode", dec), ("both", (total_u8, total_f32))):
            print(f"{n:>10,} {step:>8} {a:>10.0f} {b:>10.0f} {a / b:>7.2f}x")
        verdicts.append((n, "decode (aggregator, per update)", dec[0] <= dec[1]))
        verdicts.append((n, "encode (device, once per round)", enc[0] <= enc[1]))
        verdicts.append((n, "encode + decode", total_u8 <= total_f32))
    print()
    for n, what, passed in verdicts:
        print(
            f"{'PASS' if passed else 'FAIL'}  uint8 not slower than float32: {what}, {n:,} params"
        )
    print(f"{'PASS' if ok else 'FAIL'}  <= 1.01 bytes/parameter")
    ok &= codec_table()
    return 0 if ok and all(v[2] for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
