"""Optimizers applied per layer as soon as its gradient exists, and learning-rate schedules.

State lives in the arena as pinned tensors (`<weight>:opt<k>`), zeroed at compile time.
Weight decay is L2 added to the gradient (as NNTrainer and torch.optim do): the optimizer's
`weight_decay` for every weight, plus per weight what its layer asks for (NNTrainer's
`weight_regularizer = l2norm` with `weight_regularizer_constant`, `weight_decay`, `bias_decay`;
`per_weight_decay`). A proximal term
mu/2 * ||w - anchor||^2 (FedProx, Ditto) is added the same way, as mu * (w - anchor), from an
anchor tensor (`<weight>:anchor`) that is pinned in the arena like the optimizer state.
"""

from __future__ import annotations

import math

import numpy as np

from .layers.kernels import for_backend
from .modes import DEFAULT_KERNELS
from .spec import ModelSpec, OptimizerSpec, SchedulerSpec

KERNELS = ("sgd_step", "sgd_momentum_step", "adam_step", "proximal_grad", "add_decay")
CHUNK = 1 << 16  # elements per pass where an update needs a temporary (256 KiB in float32)


def _blocks(n: int):
    return ((a, min(a + CHUNK, n)) for a in range(0, n, CHUNK))


def _add_scaled(acc: np.ndarray, alpha: float, x: np.ndarray) -> None:
    """acc += alpha * x, a chunk at a time."""
    tmp = np.empty(min(CHUNK, acc.size), acc.dtype)
    for a, z in _blocks(acc.size):
        t = tmp[: z - a]
        np.multiply(x[a:z], alpha, out=t)
        np.add(acc[a:z], t, out=acc[a:z])


def proximal_grad(g, w, anchor, mu) -> None:
    """g += mu * (w - anchor): the gradient of mu/2 * ||w - anchor||^2, added before the update."""
    tmp = np.empty(min(CHUNK, g.size), g.dtype)
    for a, z in _blocks(g.size):
        t = tmp[: z - a]
        np.subtract(w[a:z], anchor[a:z], out=t)
        np.multiply(t, mu, out=t)
        np.add(g[a:z], t, out=g[a:z])


def add_decay(g, w, c) -> None:
    """g += c * w: the gradient of c/2 * ||w||^2 (a layer's L2 regularizer or decay)."""
    _add_scaled(g, c, w)


def sgd_step(w, g, lr, wd) -> None:
    """w -= lr * (g + wd * w). The gradient is consumed (used as scratch)."""
    if wd:
        _add_scaled(g, wd, w)
    np.multiply(g, lr, out=g)
    np.subtract(w, g, out=w)


def sgd_momentum_step(w, g, v, lr, mu, wd) -> None:
    """v = mu * v + g + wd * w; w -= lr * v. The gradient is consumed."""
    np.multiply(v, mu, out=v)
    np.add(v, g, out=v)
    if wd:
        _add_scaled(v, wd, w)
    np.multiply(v, lr, out=g)
    np.subtract(w, g, out=w)


def adam_step(w, g, m, v, lr, b1, b2, eps, wd, c1, c2) -> None:
    """Adam with bias corrections c1, c2 = 1 - beta^t, a chunk at a time. The gradient is consumed."""
    if wd:
        _add_scaled(g, wd, w)
    tmp = np.empty(min(CHUNK, w.size), w.dtype)
    for a, z in _blocks(w.size):
        t, gs, ms, vs, ws = tmp[: z - a], g[a:z], m[a:z], v[a:z], w[a:z]
        np.multiply(ms, b1, out=ms)
        np.multiply(gs, 1.0 - b1, out=t)
        np.add(ms, t, out=ms)
        np.multiply(vs, b2, out=vs)
        np.multiply(gs, gs, out=t)
        np.multiply(t, 1.0 - b2, out=t)
        np.add(vs, t, out=vs)
        np.divide(vs, c2, out=t)
        np.sqrt(t, out=t)
        np.add(t, eps, out=t)
        np.divide(ms, c1, out=gs)
        np.divide(gs, t, out=gs)
        np.multiply(gs, lr, out=gs)
        np.subtract(ws, gs, out=ws)


class Optimizer:
    """Applies one update to one weight from its gradient and state views (all flat float32)."""

    def __init__(self, spec: OptimizerSpec, kernels: str = DEFAULT_KERNELS) -> None:
        self.spec = spec
        self.slots = {"sgd": 1 if spec.momentum > 0 else 0, "adam": 2}[spec.type]
        self.kernels = kernels
        self.k = for_backend(__name__, kernels)

    def apply(self, w: np.ndarray, g: np.ndarray, state: list[np.ndarray], lr: float, iteration: int,
              anchor: np.ndarray | None = None, mu: float = 0.0, decay: float = 0.0) -> None:
        """One step; with an anchor and mu > 0 the proximal gradient is added to g first, and with
        decay > 0 the layer's L2 term decay * w (g is scratch)."""
        s = self.spec
        f32 = np.float32
        w, g = w.reshape(-1), g.reshape(-1)
        if decay > 0:
            self.k.add_decay(g, w, f32(decay))
        if anchor is not None and mu > 0:
            self.k.proximal_grad(g, w, anchor.reshape(-1), f32(mu))
        if s.type == "adam":
            t = iteration + 1
            self.k.adam_step(
                w, g, state[0].reshape(-1), state[1].reshape(-1), f32(lr), f32(s.beta1), f32(s.beta2),
                f32(s.epsilon), f32(s.weight_decay), f32(1.0 - s.beta1**t), f32(1.0 - s.beta2**t),
            )
        elif self.slots:
            self.k.sgd_momentum_step(w, g, state[0].reshape(-1), f32(lr), f32(s.momentum), f32(s.weight_decay))
        else:
            self.k.sgd_step(w, g, f32(lr), f32(s.weight_decay))


def learning_rate(base: float, sched: SchedulerSpec, iteration: int) -> float:
    """The learning rate at a 0-based iteration (batch) count, as NNTrainer's schedulers compute it;
    `base` (the optimizer's rate) is what constant and exponential start from."""
    t = iteration
    if sched.type == "exponential":
        return base * sched.decay_rate ** (t / sched.decay_steps)
    if sched.type == "step":  # NNTrainer: the first boundary >= t picks the rate, past the last: the last rate
        return sched.learning_rates[sum(1 for b in sched.iterations if b < t)]
    if sched.type == "cosine":
        hi, lo, n = sched.max_learning_rate, sched.min_learning_rate, sched.decay_steps
        return lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * (t % n) / n))
    if sched.type == "linear":
        hi, lo, n = sched.max_learning_rate, sched.min_learning_rate, sched.decay_steps
        return max(lo, hi - (hi - lo) * (t / n))
    return base


# Which of a layer's weights take its weight_decay / bias_decay (and, for "weight", the L2 regularizer).
_DECAYED = {"fully_connected": ("weight", "bias"), "conv2d": ("weight", "bias"),
            "batch_normalization": ("gamma", "beta")}  # fmt: skip


def per_weight_decay(spec: ModelSpec) -> dict[str, float]:
    """L2 coefficients per weight name from the layers' NNTrainer keys: weight / gamma get
    weight_decay (+ weight_regularizer_constant when weight_regularizer = l2norm), bias / beta get
    bias_decay. Weights not listed get only the optimizer's weight_decay."""
    out: dict[str, float] = {}
    for ls in spec.layers:
        names = _DECAYED.get(ls.type)
        if names is None:
            continue
        w = ls.weight_decay or 0.0
        if ls.weight_regularizer == "l2norm":
            w += 1.0 if ls.weight_regularizer_constant is None else ls.weight_regularizer_constant
        b = ls.bias_decay or 0.0
        for name, c in zip(names, (w, b), strict=True):
            if c > 0:
                out[f"{ls.name}.{name}"] = c
    return out
