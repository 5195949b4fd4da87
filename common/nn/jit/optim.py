"""numba twins of the optimizer kernels (fedpers.nn.optim documents them)."""

from __future__ import annotations

import math

from . import kernel

KERNELS = ("sgd_step", "sgd_momentum_step", "adam_step", "proximal_grad", "add_decay")


@kernel("void({t}[::1], {t}[::1], {t}[::1], {t})")
def proximal_grad(g, w, anchor, mu):
    """g += mu * (w - anchor): the gradient of mu/2 * ||w - anchor||^2, added before the update."""
    for i in range(g.size):
        g[i] += mu * (w[i] - anchor[i])


@kernel("void({t}[::1], {t}[::1], {t})")
def add_decay(g, w, c):
    """g += c * w: the gradient of c/2 * ||w||^2 (a layer's L2 regularizer or decay)."""
    for i in range(g.size):
        g[i] += c * w[i]


@kernel("void({t}[::1], {t}[::1], {t}, {t})")
def sgd_step(w, g, lr, wd):
    for i in range(w.size):
        w[i] -= lr * (g[i] + wd * w[i])


@kernel("void({t}[::1], {t}[::1], {t}[::1], {t}, {t}, {t})")
def sgd_momentum_step(w, g, v, lr, mu, wd):
    for i in range(w.size):
        v[i] = mu * v[i] + g[i] + wd * w[i]
        w[i] -= lr * v[i]


@kernel("void({t}[::1], {t}[::1], {t}[::1], {t}[::1], {t}, {t}, {t}, {t}, {t}, {t}, {t})")
def adam_step(w, g, m, v, lr, b1, b2, eps, wd, c1, c2):
    """c1, c2 = 1 - beta^t bias corrections."""
    for i in range(w.size):
        gi = g[i] + wd * w[i]
        m[i] = b1 * m[i] + (1.0 - b1) * gi
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi
        w[i] -= lr * (m[i] / c1) / (math.sqrt(v[i] / c2) + eps)
