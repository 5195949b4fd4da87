"""Batch normalization: statistics per index of one NCHW axis, over all the others (NNTrainer's
`axis`; a (N, F) tensor reads as (N, 1, 1, F)). Unset, the axis is the channel when there is more
than one channel, else the width: per channel for conv output, per feature for (N, F) input.

Weights gamma, beta (trainable) and running_mean, running_var (statistics: no gradient, changed in
a training forward as running = momentum * running + (1 - momentum) * batch, with the biased batch
variance, as Keras and NNTrainer do). Training uses batch statistics and saves x_hat (input-sized)
and 1/std (per channel) for backward; evaluation uses the running statistics. A frozen layer
(trainable = false) always normalizes with the running statistics and leaves them alone, so its
derivative is a per-channel scale and it saves nothing. Forward and derivative work in place.
All kernels see the data as (M, C, P): M the batch times the axes before the statistics' axis, C
that axis, P the axes after it (for the channel axis: (N, C, H*W); for features: (N, F, 1)).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..order import Life
from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import REDUCE, signatures

DEFAULT_MOMENTUM = 0.99
DEFAULT_EPSILON = 1e-3


@njit(
    signatures(
        "void({t}[:,:,::1], {t}[::1], {t}[::1], {t}[:,:,::1], {t}[:,:,::1], {t}[::1], "
        "{t}[::1], {t}[::1], float64, float64, boolean)"
    ),
    cache=True,
    nogil=True,
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


@njit(
    signatures("void({t}[:,:,::1], {t}[::1], {t}[::1], {t}[::1], {t}[::1], float64, {t}[:,:,::1])"),
    cache=True,
    nogil=True,
)
def bn_eval_forward(x, gamma, beta, run_mean, run_var, eps, out):
    """out = gamma * (x - running_mean) / sqrt(running_var + eps) + beta; out may alias x."""
    n_b, c_n, p = x.shape
    for c in range(c_n):
        scale = gamma[c] / math.sqrt(run_var[c] + eps)
        shift = beta[c] - run_mean[c] * scale
        for n in range(n_b):
            for k in range(p):
                out[n, c, k] = x[n, c, k] * scale + shift


@njit(signatures("void({t}[:,:,::1], {t}[:,:,::1], {t}[::1], {t}[::1])"), cache=True, nogil=True, fastmath=REDUCE)
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


@njit(
    signatures("void({t}[:,:,::1], {t}[:,:,::1], {t}[::1], {t}[::1], {t}[:,:,::1])"),
    cache=True,
    nogil=True,
    fastmath=REDUCE,
)
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


@njit(
    signatures("void({t}[:,:,::1], {t}[::1], {t}[::1], float64, {t}[:,:,::1])"),
    cache=True,
    nogil=True,
)
def bn_frozen_backward(dy, gamma, run_var, eps, dx):
    """The derivative through fixed statistics: dx = dy * gamma / sqrt(running_var + eps); dx may alias dy."""
    n_b, c_n, p = dy.shape
    for c in range(c_n):
        scale = gamma[c] / math.sqrt(run_var[c] + eps)
        for n in range(n_b):
            for k in range(p):
                dx[n, c, k] = dy[n, c, k] * scale


@register
class BatchNormalization(Layer):
    kind = "batch_normalization"
    has_weights = True

    def finalize(self, ctx: InitContext) -> Shape:
        (shape,) = ctx.input_shapes
        if len(shape) not in (2, 4):
            raise ctx.error("input_layers", f"batch_normalization needs (features) or C:H:W input, got {shape[1:]}")
        dims = (1, 1, shape[1]) if len(shape) == 2 else tuple(shape[1:])
        axis = self.spec.axis if self.spec.axis is not None else (1 if dims[0] > 1 else 3)
        k = axis - 1
        c = dims[k]
        self.view = (math.prod(dims[:k]), c, math.prod(dims[k + 1 :]))  # per example: (lead, C, P)
        self.eps = float(self.spec.epsilon if self.spec.epsilon is not None else DEFAULT_EPSILON)
        self.momentum = float(self.spec.momentum if self.spec.momentum is not None else DEFAULT_MOMENTUM)
        self.frozen = not self.spec.trainable
        sp = self.spec
        self.gamma = ctx.request_weight("gamma", (c,), sp.gamma_initializer or "ones")
        self.beta = ctx.request_weight("beta", (c,), sp.beta_initializer or "zeros")
        self.mean = ctx.request_weight("running_mean", (c,), sp.moving_mean_initializer or "zeros", trainable=False)
        self.var = ctx.request_weight("running_var", (c,), sp.moving_variance_initializer or "ones", trainable=False)
        self.xhat = self.inv_std = None
        if not self.frozen:
            self.xhat = ctx.request_tensor("x_hat", shape, Life.FORWARD | Life.CALC_GRAD | Life.CALC_DERIV)
            self.inv_std = ctx.request_tensor("inv_std", (c,), Life.FORWARD | Life.CALC_DERIV)
        ctx.inplace = True
        ctx.deriv_inplace = True
        return shape

    def _as3(self, a: np.ndarray) -> np.ndarray:
        """(N, ...) -> the (M, C, P) view the kernels take."""
        lead, c, p = self.view
        return a.reshape(a.shape[0] * lead, c, p)

    def forward(self, run: RunContext, training: bool) -> None:
        _as3 = self._as3
        x, out = _as3(run.input()), _as3(run.output())
        gamma, beta = run.weight(self.gamma), run.weight(self.beta)
        mean, var = run.weight(self.mean), run.weight(self.var)
        if training and not self.frozen:
            bn_train_forward(
                x, gamma, beta, _as3(run.tensor(self.xhat)), out, run.tensor(self.inv_std),
                mean, var, self.eps, self.momentum, True,
            )  # fmt: skip
        else:
            bn_eval_forward(x, gamma, beta, mean, var, self.eps, out)

    def calc_gradient(self, run: RunContext) -> None:
        dgamma, dbeta = run.grad(self.gamma), run.grad(self.beta)
        if dgamma is None or dbeta is None or self.frozen:
            return
        bn_param_grad(self._as3(run.dout()), self._as3(run.tensor(self.xhat)), dgamma, dbeta)

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is None:
            return
        _as3 = self._as3
        dy = _as3(run.dout())
        if self.frozen:
            bn_frozen_backward(dy, run.weight(self.gamma), run.weight(self.var), self.eps, _as3(din))
        else:
            bn_train_backward(
                dy, _as3(run.tensor(self.xhat)), run.weight(self.gamma), run.tensor(self.inv_std), _as3(din)
            )
