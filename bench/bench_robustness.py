"""Accuracy of a digits fleet under attack, with the shipped defaults beside the clean run.

40 devices (Dirichlet 0.5) in 4 gateways and a cloud; every device trains for real on
its shard; each update travels as the encoded bytes an agent sends and goes through
the node's own admission, one-per-round rule, ledger and round fold (the receive path
of ``Aggregator`` without MQTT, so that 8 rows x 3 columns run in minutes). 10% of
the devices attack, one kind per row; the last row mixes kinds over 20%.

Columns: clean; attacked with the shipped defaults; attacked with the secure kit
(signed updates: an attacker holding its own valid key); attacked with the guards off
(weight caps and clipping disabled: what the attack does to plain FedAvg). Target: with
the shipped defaults every row within 2 points of the clean run, and no NaN ever.
Forged models and forged statuses cross MQTT; tests/integration/test_robustness.py and
test_security.py check them on a real broker.

Run: python bench/bench_robustness.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import Any

import msgspec
import numpy as np

from edgefl.aggregator.admission import UpdateGate
from edgefl.aggregator.fold import RoundFold
from edgefl.aggregator.rounds import Round, apply_delta
from edgefl.aggregator.selection import Children
from edgefl.aggregator.sync import ParentSync
from edgefl.codecs import ErrorFeedback
from edgefl.config import AggregatorSettings
from edgefl.params import Params, is_finite, subtract
from edgefl.robust import NormWindow
from edgefl.tasks import load_task, set_torch_threads
from edgefl.wire import Rejected, Status, TrainConfig, Update, encode_update, sign

GATEWAYS = 4
DEVICES = 40
KEY = bytes(range(32))
ATTACKS = ("inflation", "scale", "sign_flip", "replacement", "nan_overflow", "flood")
TARGET_POINTS = 2.0


class Node:
    """One aggregation node's receive path and round close, as ``Aggregator`` runs them."""

    def __init__(self, settings: AggregatorSettings, spec: Any, params: Params) -> None:
        self.s = settings
        self.gate = UpdateGate.from_settings(settings, spec)
        self.children = Children.from_settings(settings, 0, self.gate.credentialed)
        self.norms = NormWindow()
        self.params = params
        self.version = 0
        self.number = 0
        self.round = self._round()
        self.rejected = 0

    def _round(self) -> Round:
        s = self.s
        fold = RoundFold.from_settings(s, self.norms)
        r = Round(self.number, self.version, fold, s.min_updates, s.quorum)
        r.announced = True
        return r

    def receive(self, sender: str, payload: bytes) -> None:
        rnd = self.round
        try:
            ok = self.gate.admit(
                payload,
                sender,
                self.version,
                self.children.__contains__,
                bound=self.children.bound,
                measure=rnd.fold.measure,
                absurd=rnd.fold.reject_bound(),
            )
        except Rejected:
            self.rejected += 1
            return
        refused = rnd.admit(sender, ok, self.gate.weight(ok, rnd.version))
        if refused is not None:
            self.gate.ledger.settle(sender, refused.update.inc, refused.update.seq)
            self.rejected += 1

    def close(self) -> int:
        """Apply the round; returns its capped sample total."""
        rnd = self.round
        self.number += 1
        if rnd.updates == 0:
            self.round = self._round()
            return 0
        delta, stats = rnd.average()
        params = apply_delta(self.params, delta)
        if is_finite(params):
            self.params = params
        for sender, inc, seq in rnd.taken:
            self.gate.ledger.settle(sender, inc, seq)
        self.version += 1
        self.round = self._round()
        self.round.waiting = rnd.carry
        self.round.open_waiting(lambda ok: self.gate.weight(ok, self.version))
        return stats.samples


def _settings(role: str, node: str, column: str) -> AggregatorSettings:
    extra: dict[str, Any] = {}
    if column == "secure":
        extra = {"keys": {"*": KEY.hex()}, "require_signature": True}
    if column == "off":
        extra = {"max_weight_share": 1.0, "clip_factor": 0.0, "max_sample_ratio": 0.0}
    parent = {"parent": "cloud"} if role == "gateway" else {}
    return AggregatorSettings(id=node, role=role, evaluate=False, **parent, **extra)  # type: ignore[arg-type]


def _attack(kind: str, delta: Params, n: int, replace_to: Params) -> tuple[Params, int]:
    if kind == "inflation":  # a huge sample count on a sign-flipped delta
        return {k: -v for k, v in delta.items()}, 10**12
    if kind == "scale":
        return {k: v * np.float32(1e4) for k, v in delta.items()}, n
    if kind == "sign_flip":
        return {k: v * np.float32(-4.0) for k, v in delta.items()}, n
    if kind == "replacement":  # towards a chosen model, at the honest update's norm x 2
        target = replace_to
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
        tnorm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in target.values()))
        f = np.float32(2.0 * norm / max(tnorm, 1e-12))
        return {k: v * f for k, v in target.items()}, n
    return delta, n


def _encode(sender: str, seq: int, base: int, n: int, tensors: Any, secure: bool) -> bytes:
    update = Update(sender=sender, seq=seq, round=0, base=base, n=n, tensors=tensors)
    return encode_update(sign(update, KEY) if secure else update)


def _bomb(payload: bytes) -> bytes:
    doc = msgspec.msgpack.decode(payload)
    for t in doc["tensors"]:  # every value 255 * 1.3e36: finite, but not once summed
        t.update(codec="u8", lo=0.0, scale=1.3e36, q=b"\xff" * int(np.prod(t["shape"])))
    doc.pop("sig", None)
    return msgspec.msgpack.encode(doc)


def run(
    kind: str | None, share: float, column: str, rounds: int, seed: int, task: Any
) -> dict[str, Any]:
    """One fleet run; ``kind`` None is the clean fleet, "mixed" draws a kind per attacker."""
    rng = random.Random(seed)
    devices = [f"d{i}" for i in range(DEVICES)]
    count = 0 if kind is None else max(1, round(share * DEVICES))
    attackers = dict.fromkeys(rng.sample(devices, count), kind)
    if kind == "mixed":
        attackers = {d: rng.choice(ATTACKS) for d in attackers}
    secure = column == "secure"
    init = task.init_params(seed)
    spec = task.spec()
    cloud = Node(_settings("cloud", "cloud", column), spec, init)
    gws = {g: Node(_settings("gateway", f"g{g}", column), spec, init) for g in range(GATEWAYS)}
    syncs = {g: ParentSync(reference=dict(init), parent_version=0) for g in gws}
    data = {d: task.device_data(i, DEVICES) for i, d in enumerate(devices)}
    feedback = {d: ErrorFeedback() for d in devices}
    seqs = dict.fromkeys(devices, 0)
    for i, d in enumerate(devices):
        declared = 10**12 if attackers.get(d) == "inflation" else len(data[d])
        gws[i % GATEWAYS].children.update(d, Status(online=True, id=d, samples=declared))
    for g in gws:
        cloud.children.update(f"g{g}", Status(online=True, id=f"g{g}"))
    cfg = TrainConfig(epochs=5, batch_size=16, lr=0.05, momentum=0.9)
    target = {k: np.roll(v, 1, axis=0) - v for k, v in init.items()}  # a rotated model
    history: list[float] = []
    nan = False
    for r in range(rounds):
        for g, node in gws.items():
            local = syncs[g].adopt(cloud.params, node.params, cloud.version)
            node.params = local
            for i, d in enumerate(devices):
                if i % GATEWAYS != g:
                    continue
                result = task.train(local, data[d], cfg, seed=seed * 1000 + r * 100 + i)
                delta, n = result.delta, result.n
                if not is_finite(delta):  # diverged on a ruined model: an agent sends nothing
                    continue
                kind_d = attackers.get(d)
                if kind_d is not None:
                    delta, n = _attack(kind_d, delta, n, subtract(target, local))
                tensors = feedback[d].encode(delta)
                copies = 50 if kind_d == "flood" else 1
                for _ in range(copies):
                    payload = _encode(d, seqs[d], node.version, n, tensors, secure)
                    seqs[d] += 1
                    node.receive(d, _bomb(payload) if kind_d == "nan_overflow" else payload)
            samples = node.close()
            up = syncs[g]
            up.after_round(samples)
            if not up.due(1):
                continue
            sync = up.build(node.params, sender=f"g{g}", seq=r, round=r)
            payload = encode_update(sign(sync, KEY) if secure else sync)
            up.sent(sync, payload)
            cloud.receive(f"g{g}", payload)
        cloud.close()
        for g, up in syncs.items():  # the cloud's next Model receipts what it folded
            up.on_parent(cloud.version, r, cloud.gate.ledger.receipt(f"g{g}"))
        nan = nan or not is_finite(cloud.params)
        history.append(float(task.evaluate(cloud.params)["accuracy"]))
    to_90 = next((i + 1 for i, a in enumerate(history) if a >= 0.90), None)
    return {"final": history[-1], "to_90": to_90, "nan": nan, "history": history}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=20, help="cloud rounds per run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    set_torch_threads(1)
    task = load_task("digits", partition="dirichlet", alpha=0.5, seed=args.seed)
    started = time.perf_counter()
    clean = run(None, 0.0, "defaults", args.rounds, args.seed, task)
    print(f"clean: final accuracy {clean['final']:.3f}, rounds to 0.90: {clean['to_90']}")
    header = f"{'attack':<14}{'share':>6}{'clean':>8}{'defaults':>10}{'secure':>8}{'off':>8}"
    print(header + f"{'to 0.90 (def)':>15}{'NaN':>5}  verdict")
    rows = [(k, 0.1) for k in ATTACKS] + [("mixed", 0.2)]
    failures = 0
    for kind, share in rows:
        got = {
            c: run(kind, share, c, args.rounds, args.seed, task)
            for c in ("defaults", "secure", "off")
        }
        gap = 100 * (clean["final"] - got["defaults"]["final"])
        nan = any(g["nan"] for g in got.values() if g is not got["off"]) or got["defaults"]["nan"]
        ok = gap <= TARGET_POINTS and not nan
        failures += not ok
        print(
            f"{kind:<14}{share:>6.0%}{clean['final']:>8.3f}{got['defaults']['final']:>10.3f}"
            f"{got['secure']['final']:>8.3f}{got['off']['final']:>8.3f}"
            f"{got['defaults']['to_90']!s:>15}{'yes' if nan else 'no':>5}  "
            f"{'PASS' if ok else 'FAIL'} ({gap:+.1f} points)"
        )
    print(
        f"{len(rows) - failures}/{len(rows)} rows within {TARGET_POINTS} points of clean, "
        f"no NaN; {time.perf_counter() - started:.0f} s"
    )
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
