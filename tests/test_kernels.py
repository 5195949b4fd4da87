"""Every kernel of both backends against a plain numpy reference, in float32 and float64.

The numpy kernels (each module's KERNELS) and their numba twins (fedpers.nn.jit.<module>) run the
same checks through `K(module)`, the backend's namespace. KERNEL_CHECKS maps a kernel's name to a
check; a test fails if a module gains a kernel without one, or a backend lacks a kernel the other
has. References use an explicit numpy im2col (sliding windows over a padded array) for convolution
and pooling, and textbook formulas for batch norm, so they share no code with the kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fedpers import rng as numpy_rng
from fedpers.nn import optim
from fedpers.nn.layers import activation, batch_normalization, conv2d, dropout, kernels, loss, pooling2d, window
from fedpers.nn.layers import input as input_layer
from fedpers.nn.layers.kernels import for_backend, numba_available
from fedpers.nn.layers.window import output_size, resolve_padding
from numpy.lib.stride_tricks import sliding_window_view

from tests.probes import modules_after

MODULES = (kernels, window, conv2d, pooling2d, batch_normalization, dropout, activation, loss, optim, input_layer)
DTYPES = (np.float32, np.float64)
BACKENDS = [
    "numpy",
    pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="numba is not installed")),
]

# (N, C, H, W, F, kh, kw, stride, padding)
CONV_GEOMETRIES = [
    (2, 3, 7, 6, 4, 3, 3, (1, 1), "same"),
    (2, 3, 7, 6, 4, 3, 2, (2, 2), "same"),
    (2, 3, 8, 8, 5, 3, 3, (2, 1), (1, 2)),
    (1, 2, 9, 7, 3, 5, 3, (3, 2), "valid"),
    (2, 4, 5, 5, 2, 1, 1, (1, 1), "valid"),
    (1, 2, 4, 4, 3, 3, 3, (1, 1), (3, 2)),
    (2, 5, 6, 6, 3, 3, 3, (1, 1), "same"),
]


class Backend:
    """One backend's view of the kernel modules: K(module) is the namespace to call, extra(**kw)
    the scratch keyword arguments only the numpy kernels take."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "numba":
            from fedpers.nn import jit

            jit.enable_float64()

    def K(self, module):  # noqa: N802  (reads like a namespace)
        return for_backend(module.__name__, self.name)

    def extra(self, **scratch) -> dict:
        return scratch if self.name == "numpy" else {}


def tol(dtype) -> dict:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}


# ---- references -------------------------------------------------------------------------------
def windows(x: np.ndarray, kh: int, kw: int, stride, pads, fill=0.0) -> np.ndarray:
    """(N, C, OH, OW, kh, kw) windows of x padded by pads=(top, bottom, left, right): a numpy im2col."""
    xp = np.pad(x, ((0, 0), (0, 0), pads[:2], pads[2:]), constant_values=fill)
    return sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, :: stride[0], :: stride[1]]


def ref_conv(x, w, b, stride, pads):
    win = windows(x.astype(np.float64), w.shape[2], w.shape[3], stride, pads)
    return np.einsum("nchwkl,fckl->nfhw", win, w.astype(np.float64)) + b[None, :, None, None]


def ref_conv_wgrad(x, dy, kh, kw, stride, pads):
    win = windows(x.astype(np.float64), kh, kw, stride, pads)[:, :, : dy.shape[2], : dy.shape[3]]
    return np.einsum("nchwkl,nfhw->fckl", win, dy.astype(np.float64)), dy.sum(axis=(0, 2, 3))


def ref_conv_xgrad(dy, w, x_shape, stride, pads):
    n, c, h, wd = x_shape
    _, _, kh, kw = w.shape
    oh, ow = dy.shape[2:]
    dxp = np.zeros((n, c, h + pads[0] + pads[1], wd + pads[2] + pads[3]))
    for ki in range(kh):
        for kj in range(kw):
            contrib = np.einsum("nfhw,fc->nchw", dy.astype(np.float64), w[:, :, ki, kj].astype(np.float64))
            dxp[:, :, ki : ki + stride[0] * oh : stride[0], kj : kj + stride[1] * ow : stride[1]] += contrib
    return dxp[:, :, pads[0] : pads[0] + h, pads[2] : pads[2] + wd]


def conv_setup(geom, dtype, rng):
    n, c, h, w, f, kh, kw, stride, padding = geom
    pads = resolve_padding(padding, (h, w), (kh, kw), stride)
    oh = output_size(h, kh, stride[0], pads[0], pads[1])
    ow = output_size(w, kw, stride[1], pads[2], pads[3])
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, kh, kw)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    dy = rng.standard_normal((n, f, oh, ow)).astype(dtype)
    return x, wt, b, dy, stride, pads, (oh, ow)


# ---- checks: one per kernel ----------------------------------------------------------------------
def check_im2col(be, dtype, rng):
    """Both layouts: per sample (T, K, P) and side by side (K, T*P), against numpy windows."""
    for geom in CONV_GEOMETRIES:
        x, w, _, _, stride, pads, (oh, ow) = conv_setup(geom, dtype, rng)
        n, c, kh, kw, p = x.shape[0], x.shape[1], *w.shape[2:], oh * ow
        ref = windows(x, kh, kw, stride, pads)[:, :, :oh, :ow]  # (N, C, OH, OW, kh, kw)
        ref = ref.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, p)
        col = np.full(n * c * kh * kw * p, np.nan, dtype)
        be.K(conv2d).im2col(x, col, c * kh * kw * p, p, kh, kw, *stride, pads[0], pads[2], oh, ow)
        np.testing.assert_array_equal(col.reshape(ref.shape), ref)
        col[:] = np.nan
        be.K(conv2d).im2col(x, col, p, n * p, kh, kw, *stride, pads[0], pads[2], oh, ow)
        np.testing.assert_array_equal(col.reshape(-1, n, p), ref.transpose(1, 0, 2))
        extent = conv2d.padded_extent(*x.shape[2:], kh, kw, *stride, pads[0], pads[2], oh, ow)
        if be.name == "numpy" and extent is not None:  # one strided copy out of a zero-padded tile
            col[:] = np.nan
            padded = np.full(n * c * extent[0] * extent[1] + 5, np.nan, dtype)
            conv2d.im2col(x, col, p, n * p, kh, kw, *stride, pads[0], pads[2], oh, ow, padded=padded)
            np.testing.assert_array_equal(col.reshape(-1, n, p), ref.transpose(1, 0, 2))


def check_col2im(be, dtype, rng):
    """col2im is the adjoint of im2col: <im2col(x), G> == <x, col2im(G)>, side-by-side layout."""
    for geom in CONV_GEOMETRIES:
        x, w, _, _, stride, pads, (oh, ow) = conv_setup(geom, dtype, rng)
        n, c, kh, kw, p = x.shape[0], x.shape[1], *w.shape[2:], oh * ow
        col = np.empty(n * c * kh * kw * p, dtype)
        be.K(conv2d).im2col(x, col, p, n * p, kh, kw, *stride, pads[0], pads[2], oh, ow)
        g = rng.standard_normal(col.shape).astype(dtype)
        back = np.full(x.shape, np.nan, dtype)
        be.K(conv2d).col2im(g, back, p, n * p, kh, kw, *stride, pads[0], pads[2], oh, ow)
        np.testing.assert_allclose(np.vdot(col, g), np.vdot(x, back), **tol(dtype))


def check_pack_tile(be, dtype, rng):
    src = rng.standard_normal((3, 4, 5)).astype(dtype)
    packed = np.empty((4, 15), dtype)
    be.K(conv2d).pack_tile(src, packed)
    np.testing.assert_array_equal(packed, src.transpose(1, 0, 2).reshape(4, 15))
    back = np.empty_like(src)
    be.K(conv2d).unpack_tile(packed, back)
    np.testing.assert_array_equal(back, src)


def check_add_bias(be, dtype, rng):
    out = rng.standard_normal((2, 4, 7)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    ref = out + b[None, :, None]
    be.K(kernels).add_bias(out, b)
    np.testing.assert_allclose(out, ref, **tol(dtype))


def check_bias_grad(be, dtype, rng):
    dy = rng.standard_normal((3, 4, 10)).astype(dtype)
    db = np.empty(4, dtype)
    be.K(conv2d).bias_grad(dy, db)
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=(0, 2)), **tol(dtype))


TILES = (1, 2, 3)  # one sample, a tile dividing the batch of 2, a tile larger than it


def tile_buffers(tile: int, rows: int, cols: int, wide_rows: int, dtype):
    """A column buffer for `tile` samples side by side and, for several, the wide product buffer."""
    col = np.full((rows, tile * cols), np.nan, dtype)
    return col, (np.full((wide_rows, tile * cols), np.nan, dtype) if tile > 1 else None)


def geometry(w, stride, pads) -> conv2d.ConvGeometry:
    return conv2d.ConvGeometry(tuple(stride), pads, conv2d._is_pointwise(w.shape, stride, pads))


def padded_tile(be, x, w, stride, pads, out_hw, tile, dtype):
    """The numpy im2col's zero-padded input tile (NaN-poisoned), or None."""
    extent = conv2d.padded_extent(*x.shape[2:], *w.shape[2:], *stride, pads[0], pads[2], *out_hw)
    if be.name != "numpy" or extent is None:
        return None
    return np.full((tile, x.shape[1], *extent), np.nan, dtype)


def check_conv_forward(be, dtype, rng):
    for geom in CONV_GEOMETRIES:
        x, w, b, dy, stride, pads, (oh, ow) = conv_setup(geom, dtype, rng)
        ref = ref_conv(x, w, b, stride, pads)[:, :, :oh, :ow]
        geo = geometry(w, stride, pads)
        for tile in TILES:
            col, wide = tile_buffers(tile, w[0].size, oh * ow, w.shape[0], dtype)
            if geo.pointwise:
                col = wide = None
            out = np.full(dy.shape, np.nan, dtype)
            padded = None if geo.pointwise else padded_tile(be, x, w, stride, pads, (oh, ow), tile, dtype)
            conv2d.conv2d_forward(x, w, b, out, col, wide, geo, be.K(conv2d), padded)
            np.testing.assert_allclose(out, ref, **tol(dtype), err_msg=f"{geom} tile={tile}")


def check_conv_weight_grad(be, dtype, rng):
    """dW straight into the gradient: the first tile's product, later tiles through `part`."""
    for geom in CONV_GEOMETRIES:
        x, w, b, dy, stride, pads, (oh, ow) = conv_setup(geom, dtype, rng)
        ref_w, ref_b = ref_conv_wgrad(x, dy, w.shape[2], w.shape[3], stride, pads)
        geo = geometry(w, stride, pads)
        for tile in TILES:
            col, pack = tile_buffers(tile, w[0].size, oh * ow, w.shape[0], dtype)
            if geo.pointwise:
                col = pack = None
            several = (1 if geo.pointwise else tile) < x.shape[0]
            gw, gb = np.full(w.shape, np.nan, dtype), np.full(b.shape, np.nan, dtype)
            part = np.full((w.shape[0], w[0].size), np.nan, dtype) if several else None
            padded = None if geo.pointwise else padded_tile(be, x, w, stride, pads, (oh, ow), tile, dtype)
            conv2d.conv2d_weight_grad(x, dy, gw, gb, col, pack, part, geo, be.K(conv2d), padded)
            np.testing.assert_allclose(gw, ref_w, **tol(dtype), err_msg=f"{geom} tile={tile}")
            np.testing.assert_allclose(gb, ref_b, **tol(dtype))


def check_conv_input_grad(be, dtype, rng):
    for geom in CONV_GEOMETRIES:
        x, w, b, dy, stride, pads, (oh, ow) = conv_setup(geom, dtype, rng)
        f, c, kh, kw = w.shape
        ref = ref_conv_xgrad(dy, w, x.shape, stride, pads)
        geo = geometry(w, stride, pads)
        for tile in TILES:
            col, wide = tile_buffers(tile, c * kh * kw, oh * ow, f, dtype)
            if geo.pointwise:
                col = wide = None
            dx = np.full(x.shape, np.nan, dtype)
            conv2d.conv2d_input_grad(dy, w, dx, col, wide, geo, be.K(conv2d))
            np.testing.assert_allclose(dx, ref, **tol(dtype), err_msg=f"{geom} tile={tile}")


POOL_GEOMETRIES = [  # (x shape, pool, stride, padding)
    ((2, 3, 6, 5), (2, 2), (2, 2), "valid"),
    ((2, 2, 7, 7), (3, 3), (2, 2), "same"),
    ((1, 2, 5, 6), (3, 2), (1, 1), (1, 1)),
    ((1, 1, 4, 4), (2, 2), (1, 1), "same"),
    ((2, 3, 8, 8), (2, 2), (2, 2), "valid"),  # windows tile the input exactly
    ((2, 3, 7, 9), (2, 2), (2, 2), "valid"),  # pairs, an odd row and column left out
]


def pool_setup(geom, dtype, rng):
    shape, pool, stride, padding = geom
    pads = resolve_padding(padding, shape[2:], pool, stride)
    oh = output_size(shape[2], pool[0], stride[0], pads[0], pads[1])
    ow = output_size(shape[3], pool[1], stride[1], pads[2], pads[3])
    x = rng.permutation(int(np.prod(shape))).reshape(shape).astype(dtype)  # distinct values
    planes = shape[0] * shape[1]
    return x, pool, stride, pads, (oh, ow), planes


def check_max_pool(be, dtype, rng):
    """max_pool_forward / max_pool_backward against nanmax over NaN-padded windows + argmax scatter;
    the code is the max's offset in its window; ties go to the first in row-major order."""
    for geom in POOL_GEOMETRIES:
        x, pool, stride, pads, (oh, ow), planes = pool_setup(geom, dtype, rng)
        win = windows(x.astype(np.float64), *pool, stride, pads, fill=np.nan)[:, :, :oh, :ow]
        out = np.full((planes, oh, ow), np.nan, dtype)
        code = np.full((planes, oh, ow), 77, np.uint8)
        x3 = x.reshape(planes, *x.shape[2:])
        flags = np.zeros((3, planes, oh, ow), bool)
        window_args = (*pool, *stride, pads[0], pads[2])
        pair = np.full(out.shape, np.nan, dtype) if pooling2d.pairs_2x2(*window_args) else None
        be.K(pooling2d).max_pool_forward(x3, out, code, *window_args, **be.extra(flags=flags, tmp=pair))
        np.testing.assert_array_equal(out, np.nanmax(win, axis=(4, 5)).reshape(out.shape))
        flat_win = win.reshape(planes, oh, ow, -1)
        np.testing.assert_array_equal(code, np.nanargmax(flat_win, axis=3))
        dy = rng.standard_normal(out.shape).astype(dtype)
        dx = np.full(x3.shape, np.nan, dtype)
        tmp = np.full(out.shape, np.nan, dtype)
        be.K(pooling2d).max_pool_backward(dy, code, dx, *window_args, **be.extra(flags=flags[0], tmp=tmp))
        ref = np.zeros(x3.shape)
        flat = x3.reshape(planes, -1)
        for q in range(planes):
            for i in range(oh):
                for j in range(ow):
                    pos = int(np.flatnonzero(flat[q] == out[q, i, j])[0])
                    ref[q].flat[pos] += dy[q, i, j]
        np.testing.assert_allclose(dx, ref, **tol(dtype))
    ties = rng.integers(0, 3, (4, 6, 8)).astype(dtype)  # many equal maxima in each 2x2 window
    out, code = np.empty((4, 3, 4), dtype), np.empty((4, 3, 4), np.uint8)
    flags, pair = np.zeros((3, 4, 3, 4), bool), np.empty((4, 3, 4), dtype)
    be.K(pooling2d).max_pool_forward(ties, out, code, 2, 2, 2, 2, 0, 0, **be.extra(flags=flags, tmp=pair))
    win = ties.reshape(4, 3, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(4, 3, 4, 4)
    np.testing.assert_array_equal(code, win.argmax(axis=3))
    np.testing.assert_array_equal(out, win.max(axis=3))


def check_avg_pool(be, dtype, rng):
    """avg_pool_forward / avg_pool_backward against nanmean (padding excluded) and an explicit scatter."""
    for geom in POOL_GEOMETRIES:
        x, pool, stride, pads, (oh, ow), planes = pool_setup(geom, dtype, rng)
        win = windows(x.astype(np.float64), *pool, stride, pads, fill=np.nan)[:, :, :oh, :ow]
        out = np.full((planes, oh, ow), np.nan, dtype)
        x3 = x.reshape(planes, *x.shape[2:])
        window_args = (*pool, *stride, pads[0], pads[2])
        be.K(pooling2d).avg_pool_forward(x3, out, *window_args)
        np.testing.assert_allclose(out, np.nanmean(win, axis=(4, 5)).reshape(out.shape), **tol(dtype))
        dy = rng.standard_normal(out.shape).astype(dtype)
        dx = np.full(x3.shape, np.nan, dtype)
        tmp = np.full(out.shape, np.nan, dtype)
        be.K(pooling2d).avg_pool_backward(dy, dx, *window_args, **be.extra(tmp=tmp))
        h, w = x3.shape[1:]
        ref = np.zeros((planes, h + pads[0] + pads[1], w + pads[2] + pads[3]))
        real = np.zeros_like(ref)
        real[:, pads[0] : pads[0] + h, pads[2] : pads[2] + w] = 1
        for i in range(oh):
            for j in range(ow):
                r, c = i * stride[0], j * stride[1]
                cnt = real[0, r : r + pool[0], c : c + pool[1]].sum()
                ref[:, r : r + pool[0], c : c + pool[1]] += dy[:, i, j, None, None] / cnt
        ref = ref[:, pads[0] : pads[0] + h, pads[2] : pads[2] + w]
        np.testing.assert_allclose(dx, ref, **tol(dtype))


def check_window_helpers(be, dtype, rng):
    """column_range (and numba's window_count) against brute force over every output position."""
    for w, kw, sw, pl in ((5, 2, 2, 0), (7, 3, 2, 1), (6, 3, 1, 2), (4, 2, 3, 1)):
        ow = output_size(w, kw, sw, pl, pl)
        for kj in range(kw):
            inside = [j for j in range(ow) if 0 <= j * sw - pl + kj < w]
            j0, j1 = be.K(window).column_range(kj, sw, pl, w, ow)
            assert list(range(j0, j1)) == inside
        if be.name == "numba":
            for j in range(ow):
                cols = sum(0 <= j * sw - pl + k < w for k in range(kw))
                assert be.K(pooling2d).window_count(0, j, 1, kw, 1, sw, 0, pl, 1, w) == cols


def check_global_max(be, dtype, rng):
    x = rng.permutation(60).reshape(6, 10).astype(dtype)
    out, idx = np.empty(6, dtype), np.empty(6, np.int64)
    be.K(pooling2d).global_max_forward(x, out, idx)
    np.testing.assert_array_equal(out, x.max(axis=1))
    np.testing.assert_array_equal(idx, x.argmax(axis=1))
    dy = rng.standard_normal(6).astype(dtype)
    dx = np.full(x.shape, np.nan, dtype)
    be.K(pooling2d).global_max_backward(dy, idx, dx)
    ref = np.zeros(x.shape, dtype)
    ref[np.arange(6), x.argmax(axis=1)] = dy
    np.testing.assert_array_equal(dx, ref)


def check_global_avg(be, dtype, rng):
    x = rng.standard_normal((6, 10)).astype(dtype)
    out = np.empty(6, dtype)
    be.K(pooling2d).global_avg_forward(x, out)
    np.testing.assert_allclose(out, x.astype(np.float64).mean(axis=1), **tol(dtype))
    dy = rng.standard_normal(6).astype(dtype)
    dx = np.full(x.shape, np.nan, dtype)
    be.K(pooling2d).global_avg_backward(dy, dx)
    np.testing.assert_allclose(dx, np.repeat(dy[:, None] / 10, 10, axis=1), **tol(dtype))


def bn_data(dtype, rng, shape=(4, 3, 5)):
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    gamma = rng.standard_normal(shape[1]).astype(dtype)
    beta = rng.standard_normal(shape[1]).astype(dtype)
    return x, gamma, beta


def check_bn_train_forward(be, dtype, rng):
    x, gamma, beta = bn_data(dtype, rng)
    c = x.shape[1]
    rm, rv = np.full(c, 0.5, dtype), np.full(c, 2.0, dtype)
    xhat, out, inv = np.empty_like(x), np.empty_like(x), np.empty(c, dtype)
    be.K(batch_normalization).bn_train_forward(x, gamma, beta, xhat, out, inv, rm, rv, 1e-3, 0.9, True)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 2)), x64.var(axis=(0, 2))
    ref_xhat = (x64 - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-3)
    np.testing.assert_allclose(xhat, ref_xhat, **tol(dtype))
    np.testing.assert_allclose(out, gamma[None, :, None] * ref_xhat + beta[None, :, None], **tol(dtype))
    np.testing.assert_allclose(inv, 1 / np.sqrt(var + 1e-3), **tol(dtype))
    np.testing.assert_allclose(rm, 0.9 * 0.5 + 0.1 * mean, **tol(dtype))
    np.testing.assert_allclose(rv, 0.9 * 2.0 + 0.1 * var, **tol(dtype))
    y = x.copy()  # in place: out is x's own buffer
    be.K(batch_normalization).bn_train_forward(y, gamma, beta, np.empty_like(x), y, inv, rm, rv, 1e-3, 0.9, False)
    np.testing.assert_allclose(y, out, **tol(dtype))


def check_bn_eval_forward(be, dtype, rng):
    x, gamma, beta = bn_data(dtype, rng)
    rm, rv = rng.standard_normal(3).astype(dtype), (rng.random(3) + 0.5).astype(dtype)
    out = np.empty_like(x)
    be.K(batch_normalization).bn_eval_forward(x, gamma, beta, rm, rv, 1e-3, out)
    ref = gamma[None, :, None] * (x - rm[None, :, None]) / np.sqrt(rv[None, :, None] + 1e-3) + beta[None, :, None]
    np.testing.assert_allclose(out, ref, **tol(dtype))


def check_bn_param_grad(be, dtype, rng):
    dy, _, _ = bn_data(dtype, rng)
    xhat = rng.standard_normal(dy.shape).astype(dtype)
    dg, db = np.empty(3, dtype), np.empty(3, dtype)
    be.K(batch_normalization).bn_param_grad(dy, xhat, dg, db)
    np.testing.assert_allclose(dg, (dy.astype(np.float64) * xhat).sum(axis=(0, 2)), **tol(dtype))
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=(0, 2)), **tol(dtype))


def check_bn_train_backward(be, dtype, rng):
    """Against the derivative of the numpy forward, composed step by step (mean, var, x_hat); also
    with dx in dy's own buffer."""
    x, gamma, _ = bn_data(dtype, rng)
    dy = rng.standard_normal(x.shape).astype(dtype)
    x64, dy64, g64 = x.astype(np.float64), dy.astype(np.float64), gamma.astype(np.float64)[None, :, None]
    m = x.shape[0] * x.shape[2]
    mu = x64.mean(axis=(0, 2), keepdims=True)
    var = x64.var(axis=(0, 2), keepdims=True)
    inv = 1 / np.sqrt(var + 1e-3)
    xhat = (x64 - mu) * inv
    dxhat = dy64 * g64
    dvar = np.sum(dxhat * (x64 - mu), axis=(0, 2), keepdims=True) * -0.5 * inv**3
    dmu = np.sum(-dxhat * inv, axis=(0, 2), keepdims=True) + dvar * np.mean(-2 * (x64 - mu), axis=(0, 2), keepdims=True)
    ref = dxhat * inv + dvar * 2 * (x64 - mu) / m + dmu / m
    dx = np.full(x.shape, np.nan, dtype)
    inv1 = inv.reshape(-1).astype(dtype)
    be.K(batch_normalization).bn_train_backward(dy, xhat.astype(dtype), gamma, inv1, dx)
    np.testing.assert_allclose(dx, ref, **tol(dtype))
    be.K(batch_normalization).bn_train_backward(dy, xhat.astype(dtype), gamma, inv1, dy)
    np.testing.assert_allclose(dy, ref, **tol(dtype))


def check_bn_frozen_backward(be, dtype, rng):
    dy, gamma, _ = bn_data(dtype, rng)
    rv = (rng.random(3) + 0.5).astype(dtype)
    dx = np.empty_like(dy)
    be.K(batch_normalization).bn_frozen_backward(dy, gamma, rv, 1e-3, dx)
    np.testing.assert_allclose(dx, dy * (gamma / np.sqrt(rv + 1e-3))[None, :, None], **tol(dtype))


def splitmix64_reference(z: int) -> int:
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def check_splitmix64(be, dtype, rng):
    for z in (0, 1, 12345, 2**63 + 17, 2**64 - 1):
        assert int(numpy_rng.splitmix64(z)) == splitmix64_reference(z)
        if be.name == "numba":
            from fedpers.nn.jit import rng as jit_rng

            assert int(jit_rng.splitmix64(np.uint64(z))) == splitmix64_reference(z)


def check_counter_stream(be, dtype, rng):
    """Draw i of the stream at key: splitmix64(key + (i + 1) * golden), mod 2^64; uniform01 its top
    53 bits; counter_hash_into fills a buffer with consecutive draws."""
    mask = (1 << 64) - 1
    for key in (0, 7, 2**64 - 1):
        for i in (0, 1, 1000, 2**40):
            z = splitmix64_reference((key + (i + 1) * 0x9E3779B97F4A7C15) & mask)
            assert int(numpy_rng.counter_hash(key, i)) == z
            assert float(numpy_rng.uniform01(key, i)) == (z >> 11) / 2.0**53
            if be.name == "numba":
                from fedpers.nn.jit import rng as jit_rng

                assert int(jit_rng.counter_hash(np.uint64(key), i)) == z
                assert jit_rng.uniform01(np.uint64(key), i) == (z >> 11) / 2.0**53
        out, tmp = np.empty(300, np.uint64), np.empty(300, np.uint64)
        numpy_rng.counter_hash_into(key, 40, out, tmp)
        np.testing.assert_array_equal(out, numpy_rng.counter_hash(key, np.arange(40, 340)))
    u = numpy_rng.uniform01(3, np.arange(20000))
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01


def check_dropout(be, dtype, rng):
    """Mask rate near 1 - p, out = x * mask / (1 - p), same seed same mask, other seed other mask;
    both backends draw the same mask."""
    x = (rng.random(20000) + 0.5).astype(dtype)
    out, mask, mask2 = np.empty_like(x), np.empty(x.size, np.uint8), np.empty(x.size, np.uint8)
    hashes = np.empty((2, 4096), np.uint64)
    fwd = be.K(dropout).dropout_forward
    fwd(x, out, mask, 0.3, np.uint64(42), **be.extra(hashes=hashes))
    assert abs(mask.mean() - 0.7) < 0.02
    np.testing.assert_allclose(out, x * mask / 0.7, **tol(dtype))
    fwd(x, np.empty_like(x), mask2, 0.3, np.uint64(42), **be.extra(hashes=hashes))
    np.testing.assert_array_equal(mask, mask2)
    dropout.dropout_forward(x, np.empty_like(x), mask2, 0.3, np.uint64(42), hashes=hashes)  # numpy's
    np.testing.assert_array_equal(mask, mask2)
    fwd(x, np.empty_like(x), mask2, 0.3, np.uint64(43), **be.extra(hashes=hashes))
    assert (mask != mask2).mean() > 0.3
    dy = rng.standard_normal(x.size).astype(dtype)
    dx = np.empty_like(dy)
    be.K(dropout).dropout_backward(dy, mask, 0.3, dx)
    np.testing.assert_allclose(dx, dy * mask / 0.7, **tol(dtype))


def check_activation(be, dtype, rng):
    """The elementwise activations (output-based backward) and row softmax against numpy."""
    x = rng.standard_normal(50).astype(dtype) * 3
    dy = rng.standard_normal(50).astype(dtype)
    refs = {
        "relu": (np.maximum(x, 0), lambda y: dy * (y > 0)),
        "sigmoid": (1 / (1 + np.exp(-x.astype(np.float64))), lambda y: dy * y * (1 - y)),
        "tanh": (np.tanh(x), lambda y: dy * (1 - y * y)),
    }
    k = be.K(activation)
    for name, (fwd, bwd) in activation.ELEMENTWISE.items():
        y = np.empty_like(x)
        getattr(k, fwd)(x, y)
        np.testing.assert_allclose(y, refs[name][0], **tol(dtype))
        dx = np.empty_like(x)
        scratch = {"flags": np.empty(50, bool)} if name == "relu" else {"tmp": np.empty(50, dtype)}
        getattr(k, bwd)(y, dy, dx, **be.extra(**scratch))
        np.testing.assert_allclose(dx, refs[name][1](y), **tol(dtype))
    x2, dy2 = x.reshape(5, 10), dy.reshape(5, 10)
    y2 = np.empty_like(x2)
    rows = np.empty(5, dtype)
    k.softmax_forward(x2, y2, **be.extra(rows=rows))
    e = np.exp(x2.astype(np.float64) - x2.max(axis=1, keepdims=True))
    np.testing.assert_allclose(y2, e / e.sum(axis=1, keepdims=True), **tol(dtype))
    dx2 = np.empty_like(x2)
    k.softmax_backward(y2, dy2, dx2, **be.extra(rows=rows))
    np.testing.assert_allclose(dx2, y2 * (dy2 - (dy2 * y2).sum(axis=1, keepdims=True)), **tol(dtype))


def check_relu_mask(be, dtype, rng):
    """Sign bits: bit i & 7 of byte i >> 3 is x[i] > 0 (the same bytes in both backends); backward
    passes dy where the bit is set; in place (out = x, dx = dy) too; sizes not a multiple of 8."""
    k = be.K(activation)
    for n in (1, 7, 8, 50, 1003):
        x = rng.standard_normal(n).astype(dtype)
        x[::5] = 0.0  # zero is not positive
        bits = np.full(-(-n // 8), 0xAA, np.uint8)
        flags = np.ones(activation.sign_bytes(n), bool)
        out = np.full(n, np.nan, dtype)
        k.relu_mask_forward(x, out, bits, **be.extra(flags=flags))
        np.testing.assert_array_equal(out, np.maximum(x, 0))
        np.testing.assert_array_equal(np.unpackbits(bits, bitorder="little")[:n], (x > 0).astype(np.uint8))
        assert not np.unpackbits(bits, bitorder="little")[n:].any()
        dy = rng.standard_normal(n).astype(dtype)
        dx = np.full(n, np.nan, dtype)
        k.relu_mask_backward(bits, dy, dx, **be.extra(flags=flags))
        np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0))
        y = x.copy()
        k.relu_mask_forward(y, y, bits, **be.extra(flags=flags))
        np.testing.assert_array_equal(y, np.maximum(x, 0))
        k.relu_mask_backward(bits, dy, dy, **be.extra(flags=flags))
        np.testing.assert_array_equal(dy, dx)


def check_cross_entropy(be, dtype, rng):
    """Fused softmax + cross entropy: summed -log p[label], correct count, probabilities (also in the
    logits' own buffer) and dlogits = (p - onehot) * scale."""
    logits = (rng.standard_normal((6, 5)) * 3).astype(dtype)
    labels = rng.integers(0, 5, 6).astype(np.int64)
    l64 = logits.astype(np.float64)
    p = np.exp(l64 - l64.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    probs = np.full_like(logits, np.nan)
    rows = np.empty(6, dtype)
    total, correct = be.K(loss).cross_entropy_forward(logits, labels, probs, **be.extra(rows=rows))
    assert total == pytest.approx(-np.log(p[np.arange(6), labels]).sum(), rel=1e-5)
    assert correct == int((l64.argmax(axis=1) == labels).sum())
    np.testing.assert_allclose(probs, p, **tol(dtype))
    inplace = logits.copy()
    be.K(loss).cross_entropy_forward(inplace, labels, inplace, **be.extra(rows=rows))
    np.testing.assert_allclose(inplace, p, **tol(dtype))
    d = np.full_like(logits, np.nan)
    be.K(loss).cross_entropy_backward(probs, labels, dtype(0.25), d)
    onehot = np.eye(5)[labels]
    np.testing.assert_allclose(d, (probs - onehot) * 0.25, **tol(dtype))


def check_optimizer(be, dtype, rng):
    """SGD, SGD with momentum and Adam (weight decay, bias correction) and the proximal gradient
    against their textbook updates in float64."""
    n = optim.CHUNK + 37  # more than one chunk of the numpy kernels
    w0, g0, a = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    k = be.K(optim)
    lr, wd, mu, b1, b2, eps = 0.1, 0.01, 0.9, 0.9, 0.999, 1e-8
    f = dtype
    w64, g64 = w0.astype(np.float64), g0.astype(np.float64)
    w, g = w0.copy(), g0.copy()
    k.sgd_step(w, g, f(lr), f(wd))
    np.testing.assert_allclose(w, w64 - lr * (g64 + wd * w64), **tol(dtype))
    w, g, v = w0.copy(), g0.copy(), np.full(n, 0.5, dtype)
    k.sgd_momentum_step(w, g, v, f(lr), f(mu), f(wd))
    v_ref = mu * 0.5 + g64 + wd * w64
    np.testing.assert_allclose(v, v_ref, **tol(dtype))
    np.testing.assert_allclose(w, w64 - lr * v_ref, **tol(dtype))
    w, g, m1, v1 = w0.copy(), g0.copy(), np.full(n, 0.1, dtype), np.full(n, 0.2, dtype)
    c1, c2 = 1 - b1**3, 1 - b2**3
    k.adam_step(w, g, m1, v1, f(lr), f(b1), f(b2), f(eps), f(wd), f(c1), f(c2))
    gi = g64 + wd * w64
    m_ref, v_ref = b1 * 0.1 + (1 - b1) * gi, b2 * 0.2 + (1 - b2) * gi * gi
    np.testing.assert_allclose(m1, m_ref, **tol(dtype))
    np.testing.assert_allclose(v1, v_ref, **tol(dtype))
    np.testing.assert_allclose(w, w64 - lr * (m_ref / c1) / (np.sqrt(v_ref / c2) + eps), rtol=1e-4, atol=1e-4)
    g = g0.copy()
    k.proximal_grad(g, w0, a, f(0.3))
    np.testing.assert_allclose(g, g64 + 0.3 * (w64 - a), **tol(dtype))
    g = g0.copy()
    k.add_decay(g, w0, f(0.05))
    np.testing.assert_allclose(g, g64 + 0.05 * w64, **tol(dtype))


def check_input_scaling(be, dtype, rng):
    """The input layer's min-max normalization (over the whole tensor) and NNTrainer's
    standardization (per row, divisor ||x - mean|| / F), constant rows and tensors included."""
    k = be.K(input_layer)
    x0 = rng.standard_normal((5, 37)).astype(dtype) * 3 + 1
    x0[2] = 4.0  # a constant row
    x64 = x0.astype(np.float64)
    x = x0.copy()
    k.min_max_normalize(x)
    np.testing.assert_allclose(x, (x64 - x64.min()) / (x64.max() - x64.min()), **tol(dtype))
    x = np.full((3, 4), 2.5, dtype)
    k.min_max_normalize(x)
    assert not x.any()
    x = x0.copy()
    k.standardize_rows(x, **be.extra(rows=np.empty(5, dtype)))
    d = x64 - x64.mean(axis=1, keepdims=True)
    scale = np.sqrt((d * d).sum(axis=1, keepdims=True)) / x64.shape[1]
    ref = np.divide(d, scale, out=np.zeros_like(d), where=scale > 0)
    np.testing.assert_allclose(x, ref, **tol(dtype))
    assert not x[2].any()


KERNEL_CHECKS: dict[str, Callable[[Backend, type, np.random.Generator], None]] = {
    "im2col": check_im2col,
    "col2im": check_col2im,
    "add_bias": check_add_bias,
    "bias_grad": check_bias_grad,
    "pack_tile": check_pack_tile,
    "unpack_tile": check_pack_tile,
    "conv2d_forward": check_conv_forward,
    "conv2d_weight_grad": check_conv_weight_grad,
    "conv2d_input_grad": check_conv_input_grad,
    "max_pool_forward": check_max_pool,
    "max_pool_backward": check_max_pool,
    "avg_pool_forward": check_avg_pool,
    "avg_pool_backward": check_avg_pool,
    "column_range": check_window_helpers,
    "window_count": check_window_helpers,
    "global_max_forward": check_global_max,
    "global_max_backward": check_global_max,
    "global_avg_forward": check_global_avg,
    "global_avg_backward": check_global_avg,
    "bn_train_forward": check_bn_train_forward,
    "bn_eval_forward": check_bn_eval_forward,
    "bn_param_grad": check_bn_param_grad,
    "bn_train_backward": check_bn_train_backward,
    "bn_frozen_backward": check_bn_frozen_backward,
    "splitmix64": check_splitmix64,
    "counter_hash": check_counter_stream,
    "uniform01": check_counter_stream,
    "dropout_forward": check_dropout,
    "dropout_backward": check_dropout,
    **{
        f"{fn}_{step}": check_activation
        for fn in ("relu", "sigmoid", "tanh", "softmax")
        for step in ("forward", "backward")
    },
    "relu_mask_forward": check_relu_mask,
    "relu_mask_backward": check_relu_mask,
    "cross_entropy_forward": check_cross_entropy,
    "cross_entropy_backward": check_cross_entropy,
    "sgd_step": check_optimizer,
    "sgd_momentum_step": check_optimizer,
    "adam_step": check_optimizer,
    "proximal_grad": check_optimizer,
    "add_decay": check_optimizer,
    "min_max_normalize": check_input_scaling,
    "standardize_rows": check_input_scaling,
}
CHECKS = sorted({f.__name__: f for f in KERNEL_CHECKS.values()}.items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "check"), CHECKS, ids=[n for n, _ in CHECKS])
def test_kernel_matches_numpy_reference(name: str, check, dtype, backend: str) -> None:
    check(Backend(backend), dtype, np.random.default_rng(0))


def test_every_kernel_has_a_reference_check() -> None:
    listed = {name for module in MODULES for name in module.KERNELS}
    assert listed <= set(KERNEL_CHECKS), f"kernels without a reference check: {sorted(listed - set(KERNEL_CHECKS))}"
    for module in MODULES:
        missing = [name for name in module.KERNELS if not callable(getattr(module, name, None))]
        assert not missing, f"{module.__name__} lists kernels it does not define: {missing}"


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_numba_twins_define_the_same_kernels_and_nothing_unchecked() -> None:
    """Each fedpers.nn.jit module has the KERNELS of its numpy module, and every numba dispatcher
    there has a check."""
    from numba.core.registry import CPUDispatcher

    for module in MODULES:
        twin = for_backend(module.__name__, "numba")
        assert twin.KERNELS == module.KERNELS, module.__name__
        assert all(isinstance(getattr(twin, n, None), CPUDispatcher) for n in twin.KERNELS), twin.__name__
        jitted = {n for n, obj in vars(twin).items()
                  if isinstance(obj, CPUDispatcher) and obj.__module__ == twin.__name__}
        assert jitted <= set(KERNEL_CHECKS), f"{twin.__name__}: {sorted(jitted - set(KERNEL_CHECKS))}"


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
@pytest.mark.parametrize(
    "name", ["im2col", "col2im", "max_pool_forward", "avg_pool_forward", "bn_train_forward", "dropout_forward",
             "relu_mask_forward", "cross_entropy_forward", "sgd_step"]
)
def test_hot_kernels_refuse_other_dtypes(name: str) -> None:
    """Explicit signatures: a float16 array is an error, not a silent recompilation."""
    module = next(m for m in MODULES if name in m.KERNELS)
    kernel = getattr(for_backend(module.__name__, "numba"), name)
    assert not kernel._can_compile
    assert {str(s[0].dtype) for s in kernel.signatures} <= {"float32", "float64"}
    with pytest.raises(TypeError):
        kernel(*[np.zeros(8, np.float16)] * kernel.py_func.__code__.co_argcount)


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_numba_compiles_float32_only_until_the_gradient_checks_ask() -> None:
    """A device compiles (or loads) float32 kernels only; float64 exists for the gradient checks."""
    code = ("from fedpers.nn.jit import conv2d, enable_float64\n"
            "assert [str(s[0].dtype) for s in conv2d.im2col.signatures] == ['float32']\n"
            "enable_float64()\n"
            "assert [str(s[0].dtype) for s in conv2d.im2col.signatures] == ['float32', 'float64']\n")
    assert "fedpers.nn.jit.conv2d" in modules_after(code)


def test_numpy_kernels_load_no_numba() -> None:
    """Training on the numpy backend never imports numba or llvmlite."""
    code = ("import numpy as np\nfrom fedpers.nn import Trainer, load_ini\nfrom fedpers.models import path\n"
            "t = Trainer(load_ini(path('digits_cnn.ini')))\n"
            "t.fit(np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64), epochs=1, batch_size=2)\n")
    mods = modules_after(code)
    assert "fedpers.nn.layers.conv2d" in mods and not {"numba", "llvmlite"} & mods
