"""numba twins of the activation kernels (fedpers.nn.layers.activation documents them)."""

from __future__ import annotations

import numpy as np

from . import kernel

KERNELS = (
    "relu_forward", "relu_backward", "relu_mask_forward", "relu_mask_backward", "sigmoid_forward",
    "sigmoid_backward", "tanh_forward", "tanh_backward", "softmax_forward", "softmax_backward",
)  # fmt: skip


@kernel("void({t}[::1], {t}[::1])")
def relu_forward(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v if v > 0.0 else 0.0


@kernel("void({t}[::1], {t}[::1], {t}[::1])")
def relu_backward(y, dy, dx):
    # `0 * g` keeps both arms loads of g: a select, not a branch. dx is usually dy's own buffer, and
    # a branch on random signs in that (unvectorized, aliased) loop measured 20x slower.
    for i in range(y.size):
        g = dy[i]
        dx[i] = g if y[i] > 0.0 else g * 0.0


@kernel("void({t}[::1], {t}[::1], uint8[::1])")
def relu_mask_forward(x, out, bits):
    """out = max(x, 0) (out may alias x) and bit i & 7 of bits[i >> 3] = x[i] > 0."""
    n = x.size
    for b in range(bits.size):
        acc = 0
        for k in range(8):
            i = b * 8 + k
            if i < n:
                v = x[i]
                pos = v > 0.0
                acc |= np.uint8(pos) << k
                out[i] = v if pos else 0.0
        bits[b] = acc


@kernel("void(uint8[::1], {t}[::1], {t}[::1])")
def relu_mask_backward(bits, dy, dx):
    """dx = dy where the sign bit is set, else 0; dx may alias dy."""
    for i in range(dy.size):
        g = dy[i]
        dx[i] = g if (bits[i >> 3] >> (i & 7)) & 1 else g * 0.0


@kernel("void({t}[::1], {t}[::1])")
def sigmoid_forward(x, out):
    for i in range(x.size):
        v = x[i]
        if v >= 0.0:
            out[i] = 1.0 / (1.0 + np.exp(-v))
        else:
            e = np.exp(v)
            out[i] = e / (1.0 + e)


@kernel("void({t}[::1], {t}[::1], {t}[::1])")
def sigmoid_backward(y, dy, dx):
    for i in range(y.size):
        dx[i] = dy[i] * y[i] * (1.0 - y[i])


@kernel("void({t}[::1], {t}[::1])")
def tanh_forward(x, out):
    for i in range(x.size):
        out[i] = np.tanh(x[i])


@kernel("void({t}[::1], {t}[::1], {t}[::1])")
def tanh_backward(y, dy, dx):
    for i in range(y.size):
        dx[i] = dy[i] * (1.0 - y[i] * y[i])


@kernel("void({t}[:,::1], {t}[:,::1])")
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


@kernel("void({t}[:,::1], {t}[:,::1], {t}[:,::1])")
def softmax_backward(y, dy, dx):
    rows, n = y.shape
    for r in range(rows):
        dot = 0.0
        for j in range(n):
            dot += dy[r, j] * y[r, j]
        for j in range(n):
            dx[r, j] = y[r, j] * (dy[r, j] - dot)
