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

from ..order import Life
from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import for_backend

KERNELS = ("bn_train_forward", "bn_eval_forward", "bn_param_grad", "bn_train_backward", "bn_frozen_backward")
DEFAULT_MOMENTUM = 0.99
DEFAULT_EPSILON = 1e-3


def _c(v: np.ndarray) -> np.ndarray:
    """A per-channel vector as (1, C, 1), to broadcast over (N, C, P)."""
    return v[None, :, None]


def bn_train_forward(x, gamma, beta, xhat, out, inv_std, run_mean, run_var, eps, momentum, update) -> None:
    """Normalize with batch statistics; xhat and inv_std are saved for backward. out may alias x.
    The (C,) statistics are small temporaries; the two passes over x are numpy's pairwise sums."""
    n_b, _, p = x.shape
    m = n_b * p
    np.sum(x, axis=(0, 2), out=inv_std)
    mean = inv_std / m
    np.subtract(x, _c(mean), out=xhat)
    np.einsum("ncp,ncp->c", xhat, xhat, out=inv_std)
    var = inv_std / m
    np.copyto(inv_std, 1.0 / np.sqrt(var + eps), casting="same_kind")  # alloc-ok: (C,)
    np.multiply(xhat, _c(inv_std), out=xhat)
    np.multiply(xhat, _c(gamma), out=out)
    np.add(out, _c(beta), out=out)
    if update:
        np.copyto(run_mean, momentum * run_mean + (1.0 - momentum) * mean, casting="same_kind")
        np.copyto(run_var, momentum * run_var + (1.0 - momentum) * var, casting="same_kind")


def bn_eval_forward(x, gamma, beta, run_mean, run_var, eps, out) -> None:
    """out = gamma * (x - running_mean) / sqrt(running_var + eps) + beta; out may alias x."""
    scale = gamma / np.sqrt(run_var + np.asarray(eps, run_var.dtype))  # alloc-ok: (C,)
    shift = beta - run_mean * scale
    np.multiply(x, _c(scale), out=out)
    np.add(out, _c(shift), out=out)


def bn_param_grad(dy, xhat, dgamma, dbeta) -> None:
    """dgamma = sum dy * x_hat, dbeta = sum dy, per channel."""
    np.einsum("ncp,ncp->c", dy, xhat, out=dgamma)
    np.sum(dy, axis=(0, 2), out=dbeta)


def bn_train_backward(dy, xhat, gamma, inv_std, dx) -> None:
    """dx = gamma * inv_std / M * (M * dy - sum dy - x_hat * sum(dy * x_hat)); dx may alias dy.
    This is x_hat's last use: it is overwritten (with x_hat * mean(dy * x_hat))."""
    n_b, _, p = dy.shape
    m = n_b * p
    mean_dy = np.sum(dy, axis=(0, 2)) / m  # alloc-ok: (C,)
    mean_dyx = np.einsum("ncp,ncp->c", dy, xhat) / m  # alloc-ok: (C,)
    k1 = gamma * inv_std
    np.multiply(xhat, _c(mean_dyx), out=xhat)
    np.subtract(dy, xhat, out=dx)
    np.subtract(dx, _c(mean_dy), out=dx)
    np.multiply(dx, _c(k1), out=dx)


def bn_frozen_backward(dy, gamma, run_var, eps, dx) -> None:
    """The derivative through fixed statistics: dx = dy * gamma / sqrt(running_var + eps); dx may alias dy."""
    scale = gamma / np.sqrt(run_var + np.asarray(eps, run_var.dtype))  # alloc-ok: (C,)
    np.multiply(dy, _c(scale), out=dx)


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
        self.k = for_backend(__name__, ctx.kernels)
        sp = self.spec
        self.gamma = ctx.request_weight("gamma", (c,), sp.gamma_initializer or "ones")
        self.beta = ctx.request_weight("beta", (c,), sp.beta_initializer or "zeros")
        self.mean = ctx.request_weight("running_mean", (c,), sp.moving_mean_initializer or "zeros", trainable=False)
        self.var = ctx.request_weight("running_var", (c,), sp.moving_variance_initializer or "ones", trainable=False)
        self.xhat = self.inv_std = None
        self.sums = None
        if not self.frozen:
            self.xhat = ctx.request_tensor("x_hat", shape, Life.FORWARD | Life.CALC_GRAD | Life.CALC_DERIV)
            self.inv_std = ctx.request_tensor("inv_std", (c,), Life.FORWARD | Life.CALC_DERIV)
            if ctx.accumulates:  # this micro-batch's dgamma, dbeta before they are added
                self.sums = ctx.request_tensor("param_grads", (2, c), Life.CALC_GRAD)
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
            self.k.bn_train_forward(
                x, gamma, beta, _as3(run.tensor(self.xhat)), out, run.tensor(self.inv_std),
                mean, var, self.eps, self.momentum, True,
            )  # fmt: skip
        else:
            self.k.bn_eval_forward(x, gamma, beta, mean, var, self.eps, out)

    def calc_gradient(self, run: RunContext) -> None:
        _as3 = self._as3
        dgamma, dbeta = run.grad(self.gamma), run.grad(self.beta)
        if dgamma is None or dbeta is None or self.frozen:
            return
        if not run.accumulate:
            self.k.bn_param_grad(_as3(run.dout()), _as3(run.tensor(self.xhat)), dgamma, dbeta)
            return
        sums = run.tensor(self.sums)
        self.k.bn_param_grad(_as3(run.dout()), _as3(run.tensor(self.xhat)), sums[0], sums[1])
        np.add(dgamma, sums[0], out=dgamma)
        np.add(dbeta, sums[1], out=dbeta)

    def calc_derivative(self, run: RunContext) -> None:
        _as3 = self._as3
        din = run.din()
        if din is None:
            return
        dy = _as3(run.dout())
        if self.frozen:
            self.k.bn_frozen_backward(dy, run.weight(self.gamma), run.weight(self.var), self.eps, _as3(din))
        else:
            self.k.bn_train_backward(
                dy, _as3(run.tensor(self.xhat)), run.weight(self.gamma), run.tensor(self.inv_std), _as3(din)
            )
