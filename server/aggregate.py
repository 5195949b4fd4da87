"""Streaming aggregators and server optimizers: pure numpy, no gRPC.

An aggregator folds each accepted delta into a running weighted sum (memory O(model), never
O(devices x model)); its `result()` is the mean delta or None when nothing arrived. A server
optimizer turns (base, mean delta) into the next base; its state is explicit so it is saved
with every model version and a restarted server carries on.

Hierarchical aggregation: `partial(devices)` is what an aggregator folded in so far as a
`PartialSum` (a plain record that encodes to one checksummed array file), and `merge(partial)`
folds one into another aggregator of the same kind as if its deltas had been added there. Server
replicas combine their partial sums when a round closes (server/cluster.py); an edge aggregator
could forward its one partial sum upstream the same way.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]


def check_delta(round_id: int | None, delta: Mapping[str, np.ndarray], weight: float,
                shapes: Mapping[str, tuple[int, ...]]) -> None:
    """AggregationError unless a round is started, the weight is positive and finite, and the delta has
    exactly the base's tensors and shapes: every aggregator checks before it changes anything."""
    if round_id is None:
        raise AggregationError("add() before start()")
    if not (math.isfinite(weight) and weight > 0):
        raise AggregationError(f"weight must be positive and finite, got {weight}")
    if set(delta) != set(shapes):
        raise AggregationError(f"delta tensors {sorted(delta)} differ from the base's {sorted(shapes)}")
    for k, shape in shapes.items():
        if tuple(np.shape(delta[k])) != tuple(shape):
            raise AggregationError(f"delta {k!r} has shape {np.shape(delta[k])}, base has {tuple(shape)}")


class AggregationError(ValueError):
    """A delta does not fit the round's base (names, shapes) or its weight is not positive."""


@dataclass(frozen=True)
class PartialSum:
    """What one aggregator folded in for a round: the running sums (or, for the robust aggregators, the
    stacked rows), their total weight and count, and the devices whose updates they hold (so a combiner
    can check them against the committed updates)."""

    round_id: int
    kind: str  # "sums" (weighted running sums, float64) or "rows" (one float32 row per update)
    arrays: dict[str, np.ndarray]
    total_weight: float
    count: int
    devices: tuple[int, ...] = ()

    def encode(self) -> bytes:
        """One checksummed array file (fedpers.store's format)."""
        from fedpers.store import encode_arrays

        meta = {"round_id": self.round_id, "kind": self.kind, "total_weight": self.total_weight,
                "count": self.count, "devices": list(self.devices)}
        return bytes(encode_arrays(self.arrays, meta))

    @classmethod
    def decode(cls, data: bytes, source: str = "<partial sum>") -> PartialSum:
        """The inverse of encode; CorruptFile (fedpers.store) when the bytes fail their checks."""
        from fedpers.store import CorruptFile, decode_arrays

        arrays, meta = decode_arrays(data, source)
        try:
            return cls(round_id=int(meta["round_id"]), kind=str(meta["kind"]), arrays=arrays,
                       total_weight=float(meta["total_weight"]), count=int(meta["count"]),
                       devices=tuple(int(d) for d in meta["devices"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFile(f"{source}: not a partial sum ({exc})") from None


class Aggregator:
    """start(round, base) -> add(delta, weight)* -> result(); subclasses may rescale each delta (`_scale`)."""

    def __init__(self) -> None:
        self.round_id: int | None = None
        self._sums: dict[str, np.ndarray] = {}
        self._scratch: dict[str, np.ndarray] = {}
        self.total_weight = 0.0
        self.count = 0

    def start(self, round_id: int, base: Mapping[str, np.ndarray]) -> None:
        """Begin a round; `base` fixes the names and shapes every delta must have (its values are unused)."""
        self.round_id = round_id
        self._sums = {k: np.zeros(np.shape(v), np.float64) for k, v in base.items()}
        self._scratch = {k: np.empty(np.shape(v), np.float64) for k, v in base.items()}  # reused by add()
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold one delta in. Checks names, shapes and weight before changing any sum."""
        check_delta(self.round_id, delta, weight, {k: s.shape for k, s in self._sums.items()})
        scale = weight * self._scale(delta)
        for k, s in self._sums.items():  # s += scale * delta, without temporaries
            np.multiply(delta[k], np.float64(scale), out=self._scratch[k])
            s += self._scratch[k]
        self.total_weight += weight
        self.count += 1

    def _scale(self, delta: Mapping[str, np.ndarray]) -> float:
        return 1.0

    def result(self) -> Arrays | None:
        """The weighted mean delta (float32), or None if no update was added."""
        if self.count == 0:
            return None
        return {k: (s / self.total_weight).astype(np.float32) for k, s in self._sums.items()}

    def fresh(self) -> Aggregator:
        """An empty aggregator of the same kind and settings (to combine partial sums into)."""
        return type(self)()

    def partial(self, devices: tuple[int, ...] = ()) -> PartialSum:
        """What this aggregator folded in so far (copies), naming the `devices` it came from."""
        if self.round_id is None:
            raise AggregationError("partial() before start()")
        return PartialSum(self.round_id, "sums", {k: s.copy() for k, s in self._sums.items()}, self.total_weight,
                          self.count, tuple(sorted(devices)))

    def merge(self, part: PartialSum) -> None:
        """Fold another aggregator's partial sum of the same round in, as if its deltas were added here.
        Checks round, kind, names and shapes before changing anything."""
        self._check_partial(part, "sums")
        for k, s in self._sums.items():
            if part.arrays[k].shape != s.shape:
                raise AggregationError(f"partial sum {k!r} has shape {part.arrays[k].shape}, base has {s.shape}")
        for k, s in self._sums.items():
            s += part.arrays[k]
        self.total_weight += part.total_weight
        self.count += part.count

    def _check_partial(self, part: PartialSum, kind: str) -> None:
        if self.round_id is None:
            raise AggregationError("merge() before start()")
        if part.round_id != self.round_id:
            raise AggregationError(f"a partial sum of round {part.round_id} cannot join round {self.round_id}")
        if part.kind != kind:
            raise AggregationError(f"a partial sum of kind {part.kind!r} cannot join a {kind!r} aggregator")
        names = set(self._sums) if kind == "sums" else {"rows"}
        if set(part.arrays) != names:
            raise AggregationError(f"partial sum tensors {sorted(part.arrays)} differ from {sorted(names)}")


class WeightedMean(Aggregator):
    """Mean of deltas weighted by example count."""


class ClippedMean(Aggregator):
    """Each delta is scaled down to global L2 norm <= clip_norm, then the weighted mean."""

    def __init__(self, clip_norm: float) -> None:
        super().__init__()
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.clip_norm = float(clip_norm)

    def fresh(self) -> Aggregator:
        return ClippedMean(self.clip_norm)

    def _scale(self, delta: Mapping[str, np.ndarray]) -> float:
        norm = global_norm(delta)
        return 1.0 if norm <= self.clip_norm else self.clip_norm / norm


def global_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all tensors together."""
    return math.sqrt(sum(float(np.dot(a.ravel().astype(np.float64), a.ravel().astype(np.float64)))
                         for a in arrays.values()))


# ------------------------------------------------------------------------------ optimizers


class ServerOptimizer(abc.ABC):
    """step(base, mean_delta) -> new base; `state()` / `load_state()` make it restartable."""

    name = "?"

    @abc.abstractmethod
    def step(self, base: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> Arrays: ...

    def state(self) -> Arrays:
        """A copy of the optimizer state (saved with each model version)."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - stateless default
        """Restore from `state()`; an empty mapping means a fresh start."""


def _check_pair(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> None:
    if set(base) != set(delta):
        raise AggregationError(f"delta tensors {sorted(delta)} differ from the base's {sorted(base)}")


class FedAvg(ServerOptimizer):
    """new = base + lr * mean."""

    name = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = float(lr)

    def step(self, base: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> Arrays:
        _check_pair(base, mean_delta)
        return {k: (base[k] + np.float32(self.lr) * mean_delta[k]).astype(np.float32) for k in base}


class FedAvgM(ServerOptimizer):
    """Server momentum: m = beta m + mean; new = base + lr m."""

    name = "fedavgm"

    def __init__(self, lr: float = 1.0, beta: float = 0.9) -> None:
        self.lr, self.beta = float(lr), float(beta)
        self.m: Arrays = {}

    def step(self, base: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> Arrays:
        _check_pair(base, mean_delta)
        m = {k: np.float32(self.beta) * self.m.get(k, np.zeros_like(mean_delta[k])) + mean_delta[k] for k in base}
        self.m = {k: v.astype(np.float32) for k, v in m.items()}
        return {k: (base[k] + np.float32(self.lr) * self.m[k]).astype(np.float32) for k in base}

    def state(self) -> Arrays:
        return {f"m/{k}": v.copy() for k, v in self.m.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.array(v, np.float32) for k, v in state.items() if k.startswith("m/")}


class FedAdam(ServerOptimizer):
    """Adam on the server (Reddi et al. 2021) with bias correction:
    m = b1 m + (1-b1) d; v = b2 v + (1-b2) d^2; new = base + lr mhat / (sqrt(vhat) + tau)."""

    name = "fedadam"

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr, self.beta1, self.beta2, self.tau = float(lr), float(beta1), float(beta2), float(tau)
        self.m: Arrays = {}
        self.v: Arrays = {}
        self.t = 0

    def step(self, base: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> Arrays:
        _check_pair(base, mean_delta)
        t = self.t + 1
        b1, b2 = self.beta1, self.beta2
        new_m, new_v, out = {}, {}, {}
        for k in base:
            d = np.asarray(mean_delta[k], np.float64)
            m = b1 * self.m.get(k, np.zeros(d.shape)) + (1 - b1) * d
            v = b2 * self.v.get(k, np.zeros(d.shape)) + (1 - b2) * d * d
            mhat = m / (1 - b1**t)
            vhat = v / (1 - b2**t)
            out[k] = (base[k] + self.lr * mhat / (np.sqrt(vhat) + self.tau)).astype(np.float32)
            new_m[k], new_v[k] = m.astype(np.float32), v.astype(np.float32)
        self.m, self.v, self.t = new_m, new_v, t
        return out

    def state(self) -> Arrays:
        st = {f"m/{k}": v.copy() for k, v in self.m.items()}
        st.update({f"v/{k}": v.copy() for k, v in self.v.items()})
        st["t"] = np.array(self.t, np.int64)
        return st

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.array(v, np.float32) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(v, np.float32) for k, v in state.items() if k.startswith("v/")}
        self.t = int(state["t"]) if "t" in state else 0


# By the names of fedpers.strategies.STRATEGIES (a test checks both lists agree).
OPTIMIZERS: dict[str, type[ServerOptimizer]] = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam}


def register_strategy(name: str, optimizer: type[ServerOptimizer], help: str) -> None:
    """Add a server strategy by name: the optimizer class (constructed with `lr` or with no argument) and a
    line of help, so `ServerConfig(strategy=name)` and the CLIs of this process accept it."""
    from fedpers.strategies import STRATEGIES

    if name in OPTIMIZERS:
        raise ValueError(f"strategy {name!r} already exists")
    OPTIMIZERS[name] = optimizer
    STRATEGIES[name] = help


def make_optimizer(strategy: str, lr: float | None = None) -> ServerOptimizer:
    """By name; `lr` None takes the strategy's default (1.0, 1.0, 0.01)."""
    try:
        kind = OPTIMIZERS[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; known: {list(OPTIMIZERS)}") from None
    return kind() if lr is None else kind(lr)


def make_aggregator(clip_norm: float | None = None) -> Aggregator:
    return WeightedMean() if clip_norm is None else ClippedMean(clip_norm)
