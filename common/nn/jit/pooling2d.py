"""numba twins of the pooling2d kernels (fedpers.nn.layers.pooling2d documents them)."""

from __future__ import annotations

from numba import njit

from . import REDUCE, kernel
from .window import column_range

KERNELS = (
    "max_pool_forward", "max_pool_backward", "avg_pool_forward", "avg_pool_backward", "global_max_forward",
    "global_max_backward", "global_avg_forward", "global_avg_backward",
)  # fmt: skip
WINDOW = "int64, int64, int64, int64, int64, int64"  # pool h, w, stride h, w, pad top, left
NO_WINDOW = 255  # the code of a window that is all padding


@kernel("void({t}[:,:,::1], {t}[:,:,::1], uint8[:,:,::1], " + WINDOW + ")")
def max_pool_forward(x, out, code, kh, kw, sh, sw, pt, pl):
    """x (planes, H, W) -> out (planes, OH, OW) and code = the max's offset in its window, ki*kw + kj
    (NO_WINDOW: all padding). Padding never wins; the first of equal maxima in row-major order wins.
    The comparisons are selects, not branches: random data would mispredict half of them."""
    planes, h, w = x.shape
    _, oh, ow = out.shape
    for q in range(planes):
        for i in range(oh):
            top = i * sh - pt
            r0 = max(top, 0)
            r1 = min(top + kh, h)
            for j in range(ow):
                left = j * sw - pl
                c0 = max(left, 0)
                c1 = min(left + kw, w)
                if r0 >= r1 or c0 >= c1:
                    out[q, i, j] = 0.0
                    code[q, i, j] = NO_WINDOW
                    continue
                best = x[q, r0, c0]
                arg = (r0 - top) * kw + (c0 - left)
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        v = x[q, r, c]
                        gt = v > best
                        best = v if gt else best
                        arg = (r - top) * kw + (c - left) if gt else arg
                out[q, i, j] = best
                code[q, i, j] = arg


@kernel("void({t}[:,:,::1], uint8[:,:,::1], {t}[:,:,::1], " + WINDOW + ")")
def max_pool_backward(dy, code, dx, kh, kw, sh, sw, pt, pl):
    """dx (planes, H, W) = dy scattered to the recorded maxima (overlapping windows add)."""
    planes, h, w = dx.shape
    _, oh, ow = dy.shape
    for q in range(planes):
        for r in range(h):
            for c in range(w):
                dx[q, r, c] = 0.0
        for i in range(oh):
            for j in range(ow):
                a = code[q, i, j]
                if a != NO_WINDOW:
                    dx[q, i * sh - pt + a // kw, j * sw - pl + a % kw] += dy[q, i, j]


@njit("int64(int64, int64, int64, int64, int64, int64, int64, int64, int64, int64)", cache=True, nogil=True)
def window_count(i, j, kh, kw, sh, sw, pt, pl, h, w):
    """Real (non-padding) elements in the window of output (i, j)."""
    rows = min(i * sh - pt + kh, h) - max(i * sh - pt, 0)
    cols = min(j * sw - pl + kw, w) - max(j * sw - pl, 0)
    return max(rows, 0) * max(cols, 0)


@kernel("void({t}[:,:,::1], {t}[:,:,::1], " + WINDOW + ")")
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


@kernel("void({t}[:,:,::1], {t}[:,:,::1], " + WINDOW + ")")
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


@kernel("void({t}[:,::1], {t}[::1], int64[::1])")
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


@kernel("void({t}[::1], int64[::1], {t}[:,::1])")
def global_max_backward(dy, idx, dx):
    planes, p = dx.shape
    for q in range(planes):
        for k in range(p):
            dx[q, k] = 0.0
        dx[q, idx[q]] = dy[q]


@kernel("void({t}[:,::1], {t}[::1])", fastmath=REDUCE)
def global_avg_forward(x, out):
    planes, p = x.shape
    for q in range(planes):
        s = 0.0
        for k in range(p):
            s += x[q, k]
        out[q] = s / p


@kernel("void({t}[::1], {t}[:,::1])")
def global_avg_backward(dy, dx):
    planes, p = dx.shape
    for q in range(planes):
        g = dy[q] / p
        for k in range(p):
            dx[q, k] = g
