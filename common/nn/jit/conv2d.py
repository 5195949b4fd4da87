"""numba twins of the conv2d kernels (fedpers.nn.layers.conv2d lists them and documents the layout).
Index arithmetic is unsigned so numba drops negative-index checks and vectorizes."""

from __future__ import annotations

from numba import uint64

from . import REDUCE, kernel
from .kernels import add_bias  # noqa: F401  (part of this kernel namespace)
from .window import column_range

KERNELS = ("im2col", "col2im", "pack_tile", "unpack_tile", "bias_grad", "add_bias")


@kernel("void({t}[:,:,:,::1], {t}[::1], int64, int64, int64, int64, int64, int64, int64, int64, int64, int64)")
def im2col(x, col, t_stride, r_stride, kh, kw, sh, sw, ph, pw, oh, ow):
    """x (T, C, H, W) -> flat col: element (t, r=(c, ki, kj), (i, j)) at t*t_stride + r*r_stride + i*ow + j
    is x[t, c, i*sh+ki-ph, j*sw+kj-pw], or 0 outside x."""
    tile, c_in, h, w = x.shape
    xf = x.reshape(x.size)
    usw = uint64(sw)
    for t in range(tile):
        for c in range(c_in):
            for ki in range(kh):
                for kj in range(kw):
                    row = t * t_stride + ((c * kh + ki) * kw + kj) * r_stride
                    off = kj - pw
                    j0, j1 = column_range(kj, sw, pw, w, ow)
                    for i in range(oh):
                        ih = i * sh + ki - ph
                        o = uint64(row + i * ow)
                        if ih < 0 or ih >= h:
                            for j in range(ow):
                                col[o + uint64(j)] = 0.0
                            continue
                        for j in range(j0):
                            col[o + uint64(j)] = 0.0
                        src = uint64(((t * c_in + c) * h + ih) * w + off + j0 * sw)
                        dst = o + uint64(j0)
                        if sw == 1:
                            for j in range(j1 - j0):
                                col[dst + uint64(j)] = xf[src + uint64(j)]
                        else:
                            for j in range(j1 - j0):
                                col[dst + uint64(j)] = xf[src + uint64(j) * usw]
                        for j in range(j1, ow):
                            col[o + uint64(j)] = 0.0


@kernel("void({t}[::1], {t}[:,:,:,::1], int64, int64, int64, int64, int64, int64, int64, int64, int64, int64)")
def col2im(col, dx, t_stride, r_stride, kh, kw, sh, sw, ph, pw, oh, ow):
    """The adjoint of im2col (same layout arguments): dx (T, C, H, W) = sum of the column entries
    taken from each position."""
    tile, c_in, h, w = dx.shape
    xf = dx.reshape(dx.size)
    usw = uint64(sw)
    for k in range(xf.size):
        xf[k] = 0.0
    for t in range(tile):
        for c in range(c_in):
            for ki in range(kh):
                for kj in range(kw):
                    row = t * t_stride + ((c * kh + ki) * kw + kj) * r_stride
                    off = kj - pw
                    j0, j1 = column_range(kj, sw, pw, w, ow)
                    for i in range(oh):
                        ih = i * sh + ki - ph
                        if ih < 0 or ih >= h:
                            continue
                        dst = uint64(((t * c_in + c) * h + ih) * w + off + j0 * sw)
                        src = uint64(row + i * ow + j0)
                        if sw == 1:
                            for j in range(j1 - j0):
                                xf[dst + uint64(j)] += col[src + uint64(j)]
                        else:
                            for j in range(j1 - j0):
                                xf[dst + uint64(j) * usw] += col[src + uint64(j)]


@kernel("void({t}[:,:,::1], {t}[:,::1])")
def pack_tile(src, dst):
    """src (T, F, P) -> dst (F, T*P): samples side by side."""
    tile, f_out, p = src.shape
    for f in range(f_out):
        for t in range(tile):
            for j in range(p):
                dst[f, t * p + j] = src[t, f, j]


@kernel("void({t}[:,::1], {t}[:,:,::1])")
def unpack_tile(src, dst):
    """src (F, T*P) -> dst (T, F, P): the inverse of pack_tile."""
    tile, f_out, p = dst.shape
    for t in range(tile):
        for f in range(f_out):
            for j in range(p):
                dst[t, f, j] = src[f, t * p + j]


@kernel("void({t}[:,:,::1], {t}[::1])", fastmath=REDUCE)
def bias_grad(dy, db):
    """db[f] = sum over samples and positions of dy (N, F, P)."""
    n_b, f_out, p = dy.shape
    for f in range(f_out):
        s = 0.0
        for n in range(n_b):
            for j in range(p):
                s += dy[n, f, j]
        db[f] = s
