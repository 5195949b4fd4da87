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
from numba import njit

from .spec import ModelSpec, OptimizerSpec, SchedulerSpec


@njit(["void(float32[::1], float32[::1], float32[::1], float32)",
      "void(float64[::1], float64[::1], float64[::1], float64)"], cache=True, nogil=True)
def proximal_grad(g, w, anchor, mu):
    """g += mu * (w - anchor): the gradient of mu/2 * ||w - anchor||^2, added before the update."""
    for i in range(g.size):
        g[i] += mu * (w[i] - anchor[i])


@njit(["void(float32[::1], float32[::1], float32)", "void(float64[::1], float64[::1], float64)"],
      cache=True, nogil=True)
def add_decay(g, w, c):
    """g += c * w: the gradient of c/2 * ||w||^2 (a layer's L2 regularizer or decay)."""
    for i in range(g.size):
        g[i] += c * w[i]


@njit(cache=True, nogil=True)
def sgd_step(w, g, lr, wd):
    for i in range(w.size):
        w[i] -= lr * (g[i] + wd * w[i])


@njit(cache=True, nogil=True)
def sgd_momentum_step(w, g, v, lr, mu, wd):
    for i in range(w.size):
        v[i] = mu * v[i] + g[i] + wd * w[i]
        w[i] -= lr * v[i]


@njit(cache=True, nogil=True)
def adam_step(w, g, m, v, lr, b1, b2, eps, wd, c1, c2):
    """c1, c2 = 1 - beta^t bias corrections."""
    for i in range(w.size):
        gi = g[i] + wd * w[i]
        m[i] = b1 * m[i] + (1.0 - b1) * gi
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi
        w[i] -= lr * (m[i] / c1) / (math.sqrt(v[i] / c2) + eps)


class Optimizer:
    """Applies one update to one weight from its gradient and state views (all flat float32)."""

    def __init__(self, spec: OptimizerSpec) -> None:
        self.spec = spec
        self.slots = {"sgd": 1 if spec.momentum > 0 else 0, "adam": 2}[spec.type]

    def apply(self, w: np.ndarray, g: np.ndarray, state: list[np.ndarray], lr: float, iteration: int,
              anchor: np.ndarray | None = None, mu: float = 0.0, decay: float = 0.0) -> None:
        """One step; with an anchor and mu > 0 the proximal gradient is added to g first, and with
        decay > 0 the layer's L2 term decay * w (g is scratch)."""
        s = self.spec
        f32 = np.float32
        w, g = w.reshape(-1), g.reshape(-1)
        if decay > 0:
            add_decay(g, w, f32(decay))
        if anchor is not None and mu > 0:
            proximal_grad(g, w, anchor.reshape(-1), f32(mu))
        if s.type == "adam":
            t = iteration + 1
            adam_step(
                w, g, state[0].reshape(-1), state[1].reshape(-1), f32(lr), f32(s.beta1), f32(s.beta2),
                f32(s.epsilon), f32(s.weight_decay), f32(1.0 - s.beta1**t), f32(1.0 - s.beta2**t),
            )
        elif self.slots:
            sgd_momentum_step(w, g, state[0].reshape(-1), f32(lr), f32(s.momentum), f32(s.weight_decay))
        else:
            sgd_step(w, g, f32(lr), f32(s.weight_decay))


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
