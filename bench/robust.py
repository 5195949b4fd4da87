"""Robust aggregation under attack: final accuracy per strategy, clean and with 20% attackers.

    python bench/robust.py [--devices 15] [--rounds 8] [--seeds 0] [--aggregations mean,trimmed,median]

One in-process federation per (aggregation, clean|attacked): the real Coordinator (policy, validation,
example cap, norm bound, aggregator, FedAvg optimizer) with a memory state and a temporary store,
and devices that are real fedpers.nn Trainers on an IID split of scikit-learn's digits (no label skew,
no distortion: the clean federation reaches ~96%, so what an attack costs is plain to see). A fully
shared MLP 64-32-10 (no personal layers); the number is the final global model's accuracy on a
held-out 20% of the digits.

Attackers (20% of devices) train like everyone else, then send, in turn:
  scale   -10 x their honest delta (scaled and sign-flipped)
  flip    -1 x their honest delta (sign-flipped)
  inflate -2 x their honest delta, claiming 10^9 examples (example-count inflation)
Each update passes the server's checks (finite, under the default norm bound, right shapes).
tests/test_robust.py runs `run()` and checks: the robust strategies stay within 2 points of the
clean run, FedAvg does not.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_INI = """
[Model]
Type = NeuralNetwork
Epochs = 1
Loss = cross
batch_size = 8

[Optimizer]
Type = sgd
Learning_rate = 0.3
momentum = 0.5

[input]
Type = input
Input_Shape = 1:8:8

[flatten]
Type = flatten

[hidden]
Type = fully_connected
Unit = 32
Activation = relu
weight_initializer = he_uniform
bias_initializer = zeros

[output]
Type = fully_connected
Unit = 10
Activation = softmax
weight_initializer = xavier_uniform
bias_initializer = zeros
"""

ATTACKS = ("scale", "flip", "inflate")
ATTACKER_FRACTION = 0.2
EPOCHS = 2  # local epochs per round


@dataclass(frozen=True)
class RunResult:
    aggregation: str
    attacked: bool
    accuracy: float
    refused: int  # attacker updates the server refused outright
    rounds: int


def _attack(kind: str, delta: dict[str, np.ndarray], examples: int) -> tuple[dict[str, np.ndarray], int]:
    if kind == "scale":
        return {k: -10.0 * v for k, v in delta.items()}, examples
    if kind == "flip":
        return {k: -v for k, v in delta.items()}, examples
    if kind == "inflate":
        return {k: -2.0 * v for k, v in delta.items()}, 10**9
    raise ValueError(f"unknown attack {kind!r}")


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray


def iid_split(devices: int, seed: int) -> tuple[list[Split], np.ndarray, np.ndarray]:
    """Device splits and the held-out (x, y): a seeded shuffle of the digits, 20% held out."""
    from fedpers.client.partition import load_digits_arrays

    x, y = load_digits_arrays()
    idx = np.random.default_rng(seed).permutation(y.size)
    n_test = y.size // 5
    parts = np.array_split(idx[n_test:], devices)
    return [Split(x[p], y[p]) for p in parts], x[idx[:n_test]], y[idx[:n_test]]


def run(aggregation: str, attacked: bool, devices: int = 15, rounds: int = 8, seed: int = 0) -> RunResult:
    """One federation; returns the final global model's accuracy on the pooled held-out splits."""
    from fedpers import codec, wire
    from fedpers.nn import Trainer, init_weights, parse_ini, weight_specs
    from fedpers.server import aggregate as ag
    from fedpers.server import errors
    from fedpers.server import state as st
    from fedpers.server.model import layout_from_specs
    from fedpers.server.robust import make_aggregator
    from fedpers.server.rounds import Coordinator, RoundPolicy
    from fedpers.store import ModelStore

    spec = parse_ini(MODEL_INI)
    layout = layout_from_specs(MODEL_INI, weight_specs(spec))
    splits, x_test, y_test = iid_split(devices, seed)
    n_attackers = int(round(ATTACKER_FRACTION * devices)) if attacked else 0
    with tempfile.TemporaryDirectory(prefix="fedpers-robust-") as tmp:
        coord = Coordinator(
            state=st.MemoryState(), store=ModelStore(Path(tmp)), layout=layout,
            initial_weights=init_weights(spec, seed), aggregator=make_aggregator(aggregation, trim=0.2),
            optimizer=ag.make_optimizer("fedavg"),
            policy=RoundPolicy(rounds=rounds, min_devices=1, seed=seed), training=wire.TrainingConfig(),
            enroll_token="robust-bench", clock=lambda: 0.0)
        ids = []
        for i in range(devices):  # in process: enroll, then start a session, as a device's first start does
            e = coord.enroll(wire.EnrollRequest("robust-bench", f"dev{i}", request_id=f"robust-bench-request-{i:04d}"))
            ids.append(coord.join(wire.JoinRequest(e.device_id, e.device_secret)).device_id)
        trainers = [Trainer(spec, seed=seed * 1000 + i) for i in range(devices)]
        refused = 0
        try:
            for _ in range(rounds):
                coord._waiting = dict.fromkeys(ids, 0.0)  # every device asks at once
                coord.tick()
                task = coord.get_task(ids[0])
                assert task.kind == wire.TaskKind.TRAIN, task
                base = wire.arrays_from_blob(coord.model_blob(task.base_version))
                for i, (d, tr, s) in enumerate(zip(ids, trainers, splits, strict=True)):
                    tr.set_weights(base, strict=False)
                    tr.fit(s.x, s.y, epochs=EPOCHS, shuffle=True, seed=seed * 7919 + i * 31 + task.round_id)
                    trained = tr.get_weights()
                    delta = {k: (trained[k] - base[k]).astype(np.float32) for k in layout.shared}
                    examples = int(s.y.size)
                    if i < n_attackers:
                        delta, examples = _attack(ATTACKS[i % len(ATTACKS)], delta, examples)
                    tensors = []
                    for k, v in delta.items():
                        payload, _ = codec.encode("fp32", v)
                        tensors.append(wire.encoded_to_wire(k, v.shape, "fp32", payload))
                    blob = wire.tensorset_to_blob(tensors)
                    hdr = wire.UpdateHeader(task.round_id, task.base_version, examples, len(blob), wire.sha256(blob),
                                            "fp32")
                    try:
                        coord.accept_update(d, hdr, wire.chunk_blob(blob))
                    except errors.BadUpdate:
                        refused += 1
                if coord.version < task.base_version + 1:  # refusals left the quorum short: close now
                    coord.clock = lambda: 1e12
                    coord.tick()
                    coord.clock = lambda: 0.0
            final = wire.arrays_from_blob(coord.model_blob(coord.version))
            with Trainer(spec) as ev:
                ev.set_weights(final, strict=False)
                acc = float(ev.evaluate(x_test, y_test).accuracy)
        finally:
            for tr in trainers:
                tr.close()
        return RunResult(aggregation, attacked, acc, refused, coord.version)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; the table shows the mean (default 0)")
    ap.add_argument("--aggregations", default="mean,trimmed,median",
                    help="comma-separated (default mean,trimmed,median)")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # rounds left short by refused attackers log warnings
    seeds = [int(s) for s in ns.seeds.split(",")]
    load = os.getloadavg()[0]
    print(f"robust aggregation: {ns.devices} devices ({int(round(ATTACKER_FRACTION * ns.devices))} attackers: "
          f"{', '.join(ATTACKS)}), {ns.rounds} rounds, seeds {seeds}; load average {load:.2f}")
    print(f"{'aggregation':>12} {'clean acc%':>11} {'attacked acc%':>14} {'drop (points)':>14} {'refused':>8}")
    for name in ns.aggregations.split(","):
        clean = [run(name, False, ns.devices, ns.rounds, s) for s in seeds]
        bad = [run(name, True, ns.devices, ns.rounds, s) for s in seeds]
        c = 100 * float(np.mean([r.accuracy for r in clean]))
        a = 100 * float(np.mean([r.accuracy for r in bad]))
        print(f"{name:>12} {c:>11.1f} {a:>14.1f} {c - a:>14.1f} {sum(r.refused for r in bad):>8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
