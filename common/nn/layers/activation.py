"""Activation layer (relu, sigmoid, tanh, softmax, none): in place, derivative in place.

Every backward formula uses the output only, so the input buffer can be overwritten.
softmax normalizes over all of an example's values (C*H*W together for image-shaped input).
numpy kernels take float / boolean scratch for their backward; the numba twins in
fedpers.nn.jit.activation need none.
"""

from __future__ import annotations

import math

import numpy as np

from ..order import Life
from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import for_backend

KERNELS = (
    "relu_forward", "relu_backward", "sigmoid_forward", "sigmoid_backward", "tanh_forward", "tanh_backward",
    "softmax_forward", "softmax_backward",
)  # fmt: skip
def relu_forward(x, out) -> None:
    np.maximum(x, 0, out=out)


def relu_backward(y, dy, dx, *, flags) -> None:
    """dx = dy where y > 0; dx may alias dy. flags: bool scratch of y's size."""
    f = flags[: y.size]
    np.greater(y, 0, out=f)
    np.multiply(dy, f, out=dx)


def sigmoid_forward(x, out) -> None:
    """1 / (1 + e^-x) as (1 + tanh(x / 2)) / 2: no overflow for any x."""
    np.multiply(x, 0.5, out=out)
    np.tanh(out, out=out)
    np.add(out, 1.0, out=out)
    np.multiply(out, 0.5, out=out)


def sigmoid_backward(y, dy, dx, *, tmp) -> None:
    """dx = dy * y * (1 - y); tmp: float scratch of y's size."""
    np.subtract(1.0, y, out=tmp)
    np.multiply(tmp, y, out=tmp)
    np.multiply(dy, tmp, out=dx)


def tanh_forward(x, out) -> None:
    np.tanh(x, out=out)


def tanh_backward(y, dy, dx, *, tmp) -> None:
    """dx = dy * (1 - y^2); tmp: float scratch of y's size."""
    np.multiply(y, y, out=tmp)
    np.subtract(1.0, tmp, out=tmp)
    np.multiply(dy, tmp, out=dx)


def softmax_forward(x, out, *, rows) -> None:
    """Row-wise softmax of a (rows, n) matrix; stable (max subtracted). rows: (rows,) scratch."""
    np.max(x, axis=1, out=rows)
    np.subtract(x, rows[:, None], out=out)
    np.exp(out, out=out)
    np.sum(out, axis=1, out=rows)
    np.divide(out, rows[:, None], out=out)


def softmax_backward(y, dy, dx, *, rows) -> None:
    """dx = y * (dy - sum(dy * y)) per row; dx may alias dy. rows: (rows,) scratch."""
    np.einsum("ij,ij->i", dy, y, out=rows)
    np.subtract(dy, rows[:, None], out=dx)
    np.multiply(dx, y, out=dx)


ELEMENTWISE = {
    "relu": ("relu_forward", "relu_backward"),
    "sigmoid": ("sigmoid_forward", "sigmoid_backward"),
    "tanh": ("tanh_forward", "tanh_backward"),
}


@register
class Activation(Layer):
    kind = "activation"

    def finalize(self, ctx: InitContext) -> Shape:
        self.fn = self.spec.activation or "none"
        self.k = for_backend(__name__, ctx.kernels)
        numpy = ctx.kernels == "numpy"
        self.flags_deriv = self.tmp = self.rows = self.rows_deriv = None
        (shape,) = ctx.input_shapes
        n = math.prod(shape)
        if self.fn == "none":
            ctx.view = True
            return shape
        ctx.inplace = True
        ctx.deriv_inplace = True
        ctx.output_life = Life.CALC_DERIV
        if numpy:
            if self.fn == "relu":
                self.flags_deriv = ctx.request_tensor("sign_bytes_deriv", (n,), Life.CALC_DERIV, np.bool_)
            elif self.fn in ("sigmoid", "tanh"):
                self.tmp = ctx.request_tensor("share", (n,), Life.CALC_DERIV)
            elif self.fn == "softmax":
                self.rows = ctx.request_tensor("row_stats", (shape[0],), Life.FORWARD)
                self.rows_deriv = ctx.request_tensor("row_stats_deriv", (shape[0],), Life.CALC_DERIV)
        return shape

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        k = self.k
        if self.fn == "none":
            if not run.aliased:
                np.copyto(out, x)
        elif self.fn == "softmax":
            extra = {} if self.rows is None else {"rows": run.tensor(self.rows)}
            k.softmax_forward(x.reshape(x.shape[0], -1), out.reshape(out.shape[0], -1), **extra)
        else:
            getattr(k, ELEMENTWISE[self.fn][0])(x.reshape(-1), out.reshape(-1))

    def calc_derivative(self, run: RunContext) -> None:
        din, dy = run.din(), run.dout()
        if din is None:
            return
        k = self.k
        if self.fn == "none":
            if din is not dy:
                np.copyto(din, dy)
        elif self.fn == "softmax":
            y = run.output()
            extra = {} if self.rows_deriv is None else {"rows": run.tensor(self.rows_deriv)}
            k.softmax_backward(y.reshape(y.shape[0], -1), dy.reshape(dy.shape[0], -1),
                               din.reshape(din.shape[0], -1), **extra)
        else:
            extra = {}
            if self.flags_deriv is not None:
                extra["flags"] = run.tensor(self.flags_deriv)
            elif self.tmp is not None:
                extra["tmp"] = run.tensor(self.tmp)
            getattr(k, ELEMENTWISE[self.fn][1])(run.output().reshape(-1), dy.reshape(-1), din.reshape(-1), **extra)
