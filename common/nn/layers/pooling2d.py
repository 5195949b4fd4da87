"""2-D pooling over NCHW data: max, average, global_max, global_average.

Max pooling records the flat position (ih*W + iw) of each window's maximum in an int32 scratch,
so backward scatters dy there without keeping the input. Average pooling divides by the number of
real (non-padding) elements in the window, as Keras and NNTrainer do, and needs nothing saved.
Global pooling reduces each channel's whole plane to one value: output (N, C, 1, 1).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..order import Life
from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import REDUCE, signatures
from .window import column_range, output_size, resolve_padding

WINDOW = "int64, int64, int64, int64, int64, int64"  # pool h, w, stride h, w, pad top, left


@njit(signatures("void({t}[:,:,::1], {t}[:,:,::1], int32[:,:,::1], " + WINDOW + ")"), cache=True, nogil=True)
def max_pool_forward(x, out, idx, kh, kw, sh, sw, pt, pl):
    """x (planes, H, W) -> out (planes, OH, OW) and idx = flat position of each max (-1: window all padding).

    Padding never wins (it is not visited); the first of equal maxima in row-major order wins.
    The comparisons are selects, not branches: random data would mispredict half of them.
    """
    planes, h, w = x.shape
    _, oh, ow = out.shape
    for q in range(planes):
        for i in range(oh):
            r0 = max(i * sh - pt, 0)
            r1 = min(i * sh - pt + kh, h)
            for j in range(ow):
                c0 = max(j * sw - pl, 0)
                c1 = min(j * sw - pl + kw, w)
                if r0 >= r1 or c0 >= c1:
                    out[q, i, j] = 0.0
                    idx[q, i, j] = -1
                    continue
                best = x[q, r0, c0]
                arg = r0 * w + c0
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        v = x[q, r, c]
                        gt = v > best
                        best = v if gt else best
                        arg = r * w + c if gt else arg
                out[q, i, j] = best
                idx[q, i, j] = arg


@njit(signatures("void({t}[:,:,::1], int32[:,:,::1], {t}[:,:,::1])"), cache=True, nogil=True)
def max_pool_backward(dy, idx, dx):
    """dx (planes, H, W) = dy scattered to the recorded maxima (overlapping windows add)."""
    planes, h, w = dx.shape
    _, oh, ow = dy.shape
    for q in range(planes):
        for r in range(h):
            for c in range(w):
                dx[q, r, c] = 0.0
        for i in range(oh):
            for j in range(ow):
                a = idx[q, i, j]
                if a >= 0:
                    dx[q, a // w, a % w] += dy[q, i, j]


@njit("int64(int64, int64, int64, int64, int64, int64, int64, int64, int64, int64)", cache=True, nogil=True)
def window_count(i, j, kh, kw, sh, sw, pt, pl, h, w):
    """Real (non-padding) elements in the window of output (i, j)."""
    rows = min(i * sh - pt + kh, h) - max(i * sh - pt, 0)
    cols = min(j * sw - pl + kw, w) - max(j * sw - pl, 0)
    return max(rows, 0) * max(cols, 0)


@njit(signatures("void({t}[:,:,::1], {t}[:,:,::1], " + WINDOW + ")"), cache=True, nogil=True)
def avg_pool_forward(x, out, kh, kw, sh, sw, pt, pl):
    """Mean over the real elements of each window (padding is not counted); row by row as max."""
    planes, h, w = x.shape
    _, oh, ow = out.shape
    for q in range(planes):
        for i in range(oh):
            for j in range(ow):
                out[q, i, j] = 0.0
            for r in range(max(i * sh - pt, 0), min(i * sh - pt + kh, h)):
                for kj in range(kw):
                    j0, j1 = column_range(kj, sw, pl, w, ow)
                    for j in range(j0, j1):
                        out[q, i, j] += x[q, r, j * sw - pl + kj]
            for j in range(ow):
                n = window_count(i, j, kh, kw, sh, sw, pt, pl, h, w)
                out[q, i, j] = out[q, i, j] / n if n > 0 else 0.0


@njit(signatures("void({t}[:,:,::1], {t}[:,:,::1], " + WINDOW + ")"), cache=True, nogil=True)
def avg_pool_backward(dy, dx, kh, kw, sh, sw, pt, pl):
    """dx = each window's dy / (its real element count), added over overlapping windows."""
    planes, h, w = dx.shape
    _, oh, ow = dy.shape
    for q in range(planes):
        for r in range(h):
            for c in range(w):
                dx[q, r, c] = 0.0
        for i in range(oh):
            r0 = max(i * sh - pt, 0)
            r1 = min(i * sh - pt + kh, h)
            for j in range(ow):
                c0 = max(j * sw - pl, 0)
                c1 = min(j * sw - pl + kw, w)
                n = (r1 - r0) * (c1 - c0)
                if r0 >= r1 or c0 >= c1:
                    continue
                g = dy[q, i, j] / n
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        dx[q, r, c] += g


@njit(signatures("void({t}[:,::1], {t}[::1], int32[::1])"), cache=True, nogil=True)
def global_max_forward(x, out, idx):
    """x (planes, H*W) -> out (planes,) = max of each plane, idx = its position (first of ties)."""
    planes, p = x.shape
    for q in range(planes):
        best = x[q, 0]
        arg = 0
        for k in range(1, p):
            if x[q, k] > best:
                best = x[q, k]
                arg = k
        out[q] = best
        idx[q] = arg


@njit(signatures("void({t}[::1], int32[::1], {t}[:,::1])"), cache=True, nogil=True)
def global_max_backward(dy, idx, dx):
    planes, p = dx.shape
    for q in range(planes):
        for k in range(p):
            dx[q, k] = 0.0
        dx[q, idx[q]] = dy[q]


@njit(signatures("void({t}[:,::1], {t}[::1])"), cache=True, nogil=True, fastmath=REDUCE)
def global_avg_forward(x, out):
    planes, p = x.shape
    for q in range(planes):
        s = 0.0
        for k in range(p):
            s += x[q, k]
        out[q] = s / p


@njit(signatures("void({t}[::1], {t}[:,::1])"), cache=True, nogil=True)
def global_avg_backward(dy, dx):
    planes, p = dx.shape
    for q in range(planes):
        g = dy[q] / p
        for k in range(p):
            dx[q, k] = g


@register
class Pooling2D(Layer):
    kind = "pooling2d"

    def finalize(self, ctx: InitContext) -> Shape:
        spec = self.spec
        if spec.pooling is None:
            raise ctx.error("pooling", "a pooling2d layer needs pooling = max | average | global_max | global_average")
        (shape,) = ctx.input_shapes
        if len(shape) != 4:
            raise ctx.error("input_layers", f"pooling2d needs a C:H:W input, got {shape[1:]}")
        n, c, h, w = shape
        self.mode = spec.pooling
        self.idx = None
        if self.mode.startswith("global"):
            if self.mode == "global_max":
                self.idx = ctx.request_tensor("argmax", (n * c,), Life.FORWARD | Life.CALC_DERIV, np.int32)
            return (n, c, 1, 1)
        if spec.pool_size is None:
            raise ctx.error("pool_size", f"{self.mode} pooling needs pool_size")
        self.size = tuple(spec.pool_size)
        self.stride = tuple(spec.stride or self.size)
        self.pads = resolve_padding(spec.padding, (h, w), self.size, self.stride)
        if self.pads[0] >= self.size[0] or self.pads[2] >= self.size[1]:
            raise ctx.error("padding", f"padding {self.pads} must be smaller than pool_size {self.size}")
        oh = output_size(h, self.size[0], self.stride[0], self.pads[0], self.pads[1])
        ow = output_size(w, self.size[1], self.stride[1], self.pads[2], self.pads[3])
        if oh <= 0 or ow <= 0:
            raise ctx.error("pool_size", f"pool {self.size} does not fit the padded {h}x{w} input")
        if self.mode == "max":
            self.idx = ctx.request_tensor("argmax", (n * c, oh, ow), Life.FORWARD | Life.CALC_DERIV, np.int32)
        return (n, c, oh, ow)

    def _window(self) -> tuple[int, int, int, int, int, int]:
        return (*self.size, *self.stride, self.pads[0], self.pads[2])

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        n, c, h, w = x.shape
        if self.mode == "global_max":
            global_max_forward(x.reshape(n * c, h * w), out.reshape(n * c), run.tensor(self.idx))
        elif self.mode == "global_average":
            global_avg_forward(x.reshape(n * c, h * w), out.reshape(n * c))
        elif self.mode == "max":
            o3 = out.reshape(n * c, *out.shape[2:])
            max_pool_forward(x.reshape(n * c, h, w), o3, run.tensor(self.idx), *self._window())
        else:
            avg_pool_forward(x.reshape(n * c, h, w), out.reshape(n * c, *out.shape[2:]), *self._window())

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is None:
            return
        dy = run.dout()
        n, c, h, w = din.shape
        if self.mode == "global_max":
            global_max_backward(dy.reshape(n * c), run.tensor(self.idx), din.reshape(n * c, h * w))
        elif self.mode == "global_average":
            global_avg_backward(dy.reshape(n * c), din.reshape(n * c, h * w))
        elif self.mode == "max":
            max_pool_backward(dy.reshape(n * c, *dy.shape[2:]), run.tensor(self.idx), din.reshape(n * c, h, w))
        else:
            avg_pool_backward(dy.reshape(n * c, *dy.shape[2:]), din.reshape(n * c, h, w), *self._window())
