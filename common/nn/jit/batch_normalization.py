"""numba twins of the batch_normalization kernels (fedpers.nn.layers.batch_normalization documents them)."""

from __future__ import annotations

import math

from . import REDUCE, kernel

KERNELS = ("bn_train_forward", "bn_eval_forward", "bn_param_grad", "bn_train_backward", "bn_frozen_backward")


@kernel(
    "void({t}[:,:,::1], {t}[::1], {t}[::1], {t}[:,:,::1], {t}[:,:,::1], {t}[::1], "
    "{t}[::1], {t}[::1], float64, float64, boolean)",
    fastmath=REDUCE,
)
def bn_train_forward(x, gamma, beta, xhat, out, inv_std, run_mean, run_var, eps, momentum, update):
    """Normalize with batch statistics; xhat and inv_std are saved for backward. out may alias x."""
    n_b, c_n, p = x.shape
    m = n_b * p
    for c in range(c_n):
        s = 0.0
        for n in range(n_b):
            for k in range(p):
                s += x[n, c, k]
        mean = s / m
        v = 0.0
        for n in range(n_b):
            for k in range(p):
                d = x[n, c, k] - mean
                v += d * d
        var = v / m
        inv = 1.0 / math.sqrt(var + eps)
        inv_std[c] = inv
        g = gamma[c]
        b = beta[c]
        for n in range(n_b):
            for k in range(p):
                xh = (x[n, c, k] - mean) * inv
                xhat[n, c, k] = xh
                out[n, c, k] = g * xh + b
        if update:
            run_mean[c] = momentum * run_mean[c] + (1.0 - momentum) * mean
            run_var[c] = momentum * run_var[c] + (1.0 - momentum) * var


@kernel("void({t}[:,:,::1], {t}[::1], {t}[::1], {t}[::1], {t}[::1], float64, {t}[:,:,::1])")
def bn_eval_forward(x, gamma, beta, run_mean, run_var, eps, out):
    """out = gamma * (x - running_mean) / sqrt(running_var + eps) + beta; out may alias x."""
    n_b, c_n, p = x.shape
    for c in range(c_n):
        scale = gamma[c] / math.sqrt(run_var[c] + eps)
        shift = beta[c] - run_mean[c] * scale
        for n in range(n_b):
            for k in range(p):
                out[n, c, k] = x[n, c, k] * scale + shift


@kernel("void({t}[:,:,::1], {t}[:,:,::1], {t}[::1], {t}[::1])", fastmath=REDUCE)
def bn_param_grad(dy, xhat, dgamma, dbeta):
    """dgamma = sum dy * x_hat, dbeta = sum dy, per channel."""
    n_b, c_n, p = dy.shape
    for c in range(c_n):
        sg = 0.0
        sb = 0.0
        for n in range(n_b):
            for k in range(p):
                d = dy[n, c, k]
                sb += d
                sg += d * xhat[n, c, k]
        dgamma[c] = sg
        dbeta[c] = sb


@kernel("void({t}[:,:,::1], {t}[:,:,::1], {t}[::1], {t}[::1], {t}[:,:,::1])", fastmath=REDUCE)
def bn_train_backward(dy, xhat, gamma, inv_std, dx):
    """dx = gamma * inv_std / M * (M * dy - sum dy - x_hat * sum(dy * x_hat)); dx may alias dy."""
    n_b, c_n, p = dy.shape
    m = n_b * p
    for c in range(c_n):
        s1 = 0.0
        s2 = 0.0
        for n in range(n_b):
            for k in range(p):
                d = dy[n, c, k]
                s1 += d
                s2 += d * xhat[n, c, k]
        k1 = gamma[c] * inv_std[c]
        mean_dy = s1 / m
        mean_dyx = s2 / m
        for n in range(n_b):
            for k in range(p):
                dx[n, c, k] = k1 * (dy[n, c, k] - mean_dy - xhat[n, c, k] * mean_dyx)


@kernel("void({t}[:,:,::1], {t}[::1], {t}[::1], float64, {t}[:,:,::1])")
def bn_frozen_backward(dy, gamma, run_var, eps, dx):
    """The derivative through fixed statistics: dx = dy * gamma / sqrt(running_var + eps); dx may alias dy."""
    n_b, c_n, p = dy.shape
    for c in range(c_n):
        scale = gamma[c] / math.sqrt(run_var[c] + eps)
        for n in range(n_b):
            for k in range(p):
                dx[n, c, k] = dy[n, c, k] * scale
