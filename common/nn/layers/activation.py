"""Activation layer (relu, sigmoid, tanh, softmax, none): in place, derivative in place.

Every backward formula uses the output only, so the input buffer can be overwritten.
softmax normalizes over all of an example's values (C*H*W together for image-shaped input).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..order import Life
from .base import InitContext, Layer, RunContext, Shape, register


@njit(cache=True, nogil=True)
def relu_forward(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v if v > 0.0 else 0.0


@njit(cache=True, nogil=True)
def relu_backward(y, dy, dx):
    # `0 * g` keeps both arms loads of g: a select, not a branch. dx is usually dy's own buffer, and
    # a branch on random signs in that (unvectorized, aliased) loop measured 20x slower.
    for i in range(y.size):
        g = dy[i]
        dx[i] = g if y[i] > 0.0 else g * 0.0


@njit(cache=True, nogil=True)
def sigmoid_forward(x, out):
    for i in range(x.size):
        v = x[i]
        if v >= 0.0:
            out[i] = 1.0 / (1.0 + np.exp(-v))
        else:
            e = np.exp(v)
            out[i] = e / (1.0 + e)


@njit(cache=True, nogil=True)
def sigmoid_backward(y, dy, dx):
    for i in range(y.size):
        dx[i] = dy[i] * y[i] * (1.0 - y[i])


@njit(cache=True, nogil=True)
def tanh_forward(x, out):
    for i in range(x.size):
        out[i] = np.tanh(x[i])


@njit(cache=True, nogil=True)
def tanh_backward(y, dy, dx):
    for i in range(y.size):
        dx[i] = dy[i] * (1.0 - y[i] * y[i])


@njit(cache=True, nogil=True)
def softmax_forward(x, out):
    """Row-wise softmax of a (rows, n) matrix; stable (max subtracted)."""
    rows, n = x.shape
    for r in range(rows):
        m = x[r, 0]
        for j in range(1, n):
            if x[r, j] > m:
                m = x[r, j]
        s = 0.0
        for j in range(n):
            e = np.exp(x[r, j] - m)
            out[r, j] = e
            s += e
        inv = 1.0 / s
        for j in range(n):
            out[r, j] *= inv


@njit(cache=True, nogil=True)
def softmax_backward(y, dy, dx):
    rows, n = y.shape
    for r in range(rows):
        dot = 0.0
        for j in range(n):
            dot += dy[r, j] * y[r, j]
        for j in range(n):
            dx[r, j] = y[r, j] * (dy[r, j] - dot)


ELEMENTWISE = {
    "relu": (relu_forward, relu_backward),
    "sigmoid": (sigmoid_forward, sigmoid_backward),
    "tanh": (tanh_forward, tanh_backward),
}


@register
class Activation(Layer):
    kind = "activation"

    def finalize(self, ctx: InitContext) -> Shape:
        self.fn = self.spec.activation or "none"
        (shape,) = ctx.input_shapes
        if self.fn == "none":
            ctx.view = True
        else:
            ctx.inplace = True
            ctx.deriv_inplace = True
            ctx.output_life = Life.CALC_DERIV
        return shape

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        if self.fn == "none":
            if not run.aliased:
                np.copyto(out, x)
        elif self.fn == "softmax":
            softmax_forward(x.reshape(x.shape[0], -1), out.reshape(out.shape[0], -1))
        else:
            ELEMENTWISE[self.fn][0](x.reshape(-1), out.reshape(-1))

    def calc_derivative(self, run: RunContext) -> None:
        din, dy = run.din(), run.dout()
        if din is None:
            return
        if self.fn == "none":
            if din is not dy:
                np.copyto(din, dy)
        elif self.fn == "softmax":
            y = run.output()
            softmax_backward(y.reshape(y.shape[0], -1), dy.reshape(dy.shape[0], -1), din.reshape(din.shape[0], -1))
        else:
            ELEMENTWISE[self.fn][1](run.output().reshape(-1), dy.reshape(-1), din.reshape(-1))
