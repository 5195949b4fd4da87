"""Every numba kernel of the layer modules against a plain numpy reference, in float32 and float64.

KERNEL_CHECKS maps a kernel's name to a check; a test fails if a module gains a kernel without one.
References use an explicit numpy im2col (sliding windows over a padded array) for convolution and
pooling, and textbook formulas for batch norm, so they share no code with the kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fedpers.nn.jit import rng as counter_rng
from fedpers.nn.layers import activation, batch_normalization, conv2d, dropout, kernels, pooling2d, window
from fedpers.nn.layers.window import output_size, resolve_padding
from numba.core.registry import CPUDispatcher
from numpy.lib.stride_tricks import sliding_window_view

MODULES = (kernels, window, conv2d, pooling2d, batch_normalization, dropout, activation, counter_rng)
DTYPES = (np.float32, np.float64)

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
def check_im2col(dtype, rng):
    """Both layouts: per sample (T, K, P) and side by side (K, T*P), against numpy windows."""
    for geom in CONV_GEOMETRIES:
        x, w, _, _, stride, pads, (oh, ow) = conv_setup(geom, dtype, rng)
        n, c, kh, kw, p = x.shape[0], x.shape[1], *w.shape[2:], oh * ow
        ref = windows(x, kh, kw, stride, pads)[:, :, :oh, :ow]  # (N, C, OH, OW, kh, kw)
        ref = ref.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, p)
        col = np.full(n * c * kh * kw * p, np.nan, dtype)
        conv2d.im2col(x, col, c * kh * kw * p, p, kh, kw, *stride, pads[0], pads[2], oh, ow)
        np.testing.assert_array_equal(col.reshape(ref.shape), ref)
        col[:] = np.nan
        conv2d.im2col(x, col, p, n * p, kh, kw, *stride, pads[0], pads[2], oh, ow)
        np.testing.assert_array_equal(col.reshape(-1, n, p), ref.transpose(1, 0, 2))


def check_col2im(dtype, rng):
    """col2im is the adjoint of im2col: <im2col(x), G> == <x, col2im(G)>, side-by-side layout."""
    for geom in CONV_GEOMETRIES:
        x, w, _, _, stride, pads, (oh, ow) = conv_setup(geom, dtype, rng)
        n, c, kh, kw, p = x.shape[0], x.shape[1], *w.shape[2:], oh * ow
        col = np.empty(n * c * kh * kw * p, dtype)
        conv2d.im2col(x, col, p, n * p, kh, kw, *stride, pads[0], pads[2], oh, ow)
        g = rng.standard_normal(col.shape).astype(dtype)
        back = np.full(x.shape, np.nan, dtype)
        conv2d.col2im(g, back, p, n * p, kh, kw, *stride, pads[0], pads[2], oh, ow)
        np.testing.assert_allclose(np.vdot(col, g), np.vdot(x, back), **tol(dtype))


def check_pack_tile(dtype, rng):
    src = rng.standard_normal((3, 4, 5)).astype(dtype)
    packed = np.empty((4, 15), dtype)
    conv2d.pack_tile(src, packed)
    np.testing.assert_array_equal(packed, src.transpose(1, 0, 2).reshape(4, 15))
    back = np.empty_like(src)
    conv2d.unpack_tile(packed, back)
    np.testing.assert_array_equal(back, src)


def check_add_bias(dtype, rng):
    out = rng.standard_normal((2, 4, 7)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    ref = out + b[None, :, None]
    kernels.add_bias(out, b)
    np.testing.assert_allclose(out, ref, **tol(dtype))


def check_bias_grad(dtype, rng):
    dy = rng.standard_normal((3, 4, 10)).astype(dtype)
    db = np.empty(4, dtype)
    conv2d.bias_grad(dy, db)
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=(0, 2)), **tol(dtype))


TILES = (1, 2, 3)  # one sample, a tile dividing the batch of 2, a tile larger than it


def tile_buffers(tile: int, rows: int, cols: int, wide_rows: int, dtype):
    """A column buffer for `tile` samples side by side and, for several, the wide product buffer."""
    col = np.full((rows, tile * cols), np.nan, dtype)
    return col, (np.full((wide_rows, tile * cols), np.nan, dtype) if tile > 1 else None)


def geometry(w, stride, pads) -> conv2d.ConvGeometry:
    return conv2d.ConvGeometry(tuple(stride), pads, conv2d._is_pointwise(w.shape, stride, pads))


def check_conv_forward(dtype, rng):
    for geom in CONV_GEOMETRIES:
        x, w, b, dy, stride, pads, (oh, ow) = conv_setup(geom, dtype, rng)
        ref = ref_conv(x, w, b, stride, pads)[:, :, :oh, :ow]
        geo = geometry(w, stride, pads)
        for tile in TILES:
            col, wide = tile_buffers(tile, w[0].size, oh * ow, w.shape[0], dtype)
            if geo.pointwise:
                col = wide = None
            out = np.full(dy.shape, np.nan, dtype)
            conv2d.conv2d_forward(x, w, b, out, col, wide, geo)
            np.testing.assert_allclose(out, ref, **tol(dtype), err_msg=f"{geom} tile={tile}")


def check_conv_weight_grad(dtype, rng):
    for geom in CONV_GEOMETRIES:
        x, w, b, dy, stride, pads, (oh, ow) = conv_setup(geom, dtype, rng)
        ref_w, ref_b = ref_conv_wgrad(x, dy, w.shape[2], w.shape[3], stride, pads)
        geo = geometry(w, stride, pads)
        for tile in TILES:
            col, pack = tile_buffers(tile, w[0].size, oh * ow, w.shape[0], dtype)
            if geo.pointwise:
                col = pack = None
            gw, gb = np.full(w.shape, np.nan, dtype), np.full(b.shape, np.nan, dtype)
            part = np.full((w[0].size, w.shape[0]), np.nan, dtype)
            acc = np.full((w[0].size, w.shape[0]), np.nan, dtype)
            conv2d.conv2d_weight_grad(x, dy, gw, gb, col, pack, part, acc, geo)
            np.testing.assert_allclose(gw, ref_w, **tol(dtype), err_msg=f"{geom} tile={tile}")
            np.testing.assert_allclose(gb, ref_b, **tol(dtype))


def check_conv_input_grad(dtype, rng):
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
            conv2d.conv2d_input_grad(dy, w, dx, col, wide, geo)
            np.testing.assert_allclose(dx, ref, **tol(dtype), err_msg=f"{geom} tile={tile}")


POOL_GEOMETRIES = [  # (x shape, pool, stride, padding)
    ((2, 3, 6, 5), (2, 2), (2, 2), "valid"),
    ((2, 2, 7, 7), (3, 3), (2, 2), "same"),
    ((1, 2, 5, 6), (3, 2), (1, 1), (1, 1)),
    ((1, 1, 4, 4), (2, 2), (1, 1), "same"),
]


def pool_setup(geom, dtype, rng):
    shape, pool, stride, padding = geom
    pads = resolve_padding(padding, shape[2:], pool, stride)
    oh = output_size(shape[2], pool[0], stride[0], pads[0], pads[1])
    ow = output_size(shape[3], pool[1], stride[1], pads[2], pads[3])
    x = rng.permutation(int(np.prod(shape))).reshape(shape).astype(dtype)  # distinct values
    planes = shape[0] * shape[1]
    return x, pool, stride, pads, (oh, ow), planes


def check_max_pool(dtype, rng):
    """max_pool_forward / max_pool_backward against nanmax over NaN-padded windows + argmax scatter."""
    for geom in POOL_GEOMETRIES:
        x, pool, stride, pads, (oh, ow), planes = pool_setup(geom, dtype, rng)
        win = windows(x.astype(np.float64), *pool, stride, pads, fill=np.nan)[:, :, :oh, :ow]
        out = np.full((planes, oh, ow), np.nan, dtype)
        idx = np.full((planes, oh, ow), -7, np.int32)
        x3 = x.reshape(planes, *x.shape[2:])
        pooling2d.max_pool_forward(x3, out, idx, *pool, *stride, pads[0], pads[2])
        np.testing.assert_array_equal(out, np.nanmax(win, axis=(4, 5)).reshape(out.shape))
        dy = rng.standard_normal(out.shape).astype(dtype)
        dx = np.full(x3.shape, np.nan, dtype)
        pooling2d.max_pool_backward(dy, idx, dx)
        ref = np.zeros(x3.shape)
        flat = x3.reshape(planes, -1)
        for q in range(planes):
            for i in range(oh):
                for j in range(ow):
                    pos = int(np.flatnonzero(flat[q] == out[q, i, j])[0])
                    ref[q].flat[pos] += dy[q, i, j]
        np.testing.assert_allclose(dx, ref, **tol(dtype))


def check_avg_pool(dtype, rng):
    """avg_pool_forward / avg_pool_backward against nanmean (padding excluded) and an explicit scatter."""
    for geom in POOL_GEOMETRIES:
        x, pool, stride, pads, (oh, ow), planes = pool_setup(geom, dtype, rng)
        win = windows(x.astype(np.float64), *pool, stride, pads, fill=np.nan)[:, :, :oh, :ow]
        out = np.full((planes, oh, ow), np.nan, dtype)
        x3 = x.reshape(planes, *x.shape[2:])
        pooling2d.avg_pool_forward(x3, out, *pool, *stride, pads[0], pads[2])
        np.testing.assert_allclose(out, np.nanmean(win, axis=(4, 5)).reshape(out.shape), **tol(dtype))
        dy = rng.standard_normal(out.shape).astype(dtype)
        dx = np.full(x3.shape, np.nan, dtype)
        pooling2d.avg_pool_backward(dy, dx, *pool, *stride, pads[0], pads[2])
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


def check_window_helpers(dtype, rng):
    """column_range / window_count against brute force over every output position."""
    for w, kw, sw, pl in ((5, 2, 2, 0), (7, 3, 2, 1), (6, 3, 1, 2), (4, 2, 3, 1)):
        ow = output_size(w, kw, sw, pl, pl)
        for kj in range(kw):
            inside = [j for j in range(ow) if 0 <= j * sw - pl + kj < w]
            j0, j1 = pooling2d.column_range(kj, sw, pl, w, ow)
            assert list(range(j0, j1)) == inside
        for j in range(ow):
            cols = sum(0 <= j * sw - pl + k < w for k in range(kw))
            assert pooling2d.window_count(0, j, 1, kw, 1, sw, 0, pl, 1, w) == cols


def check_global_max(dtype, rng):
    x = rng.permutation(60).reshape(6, 10).astype(dtype)
    out, idx = np.empty(6, dtype), np.empty(6, np.int32)
    pooling2d.global_max_forward(x, out, idx)
    np.testing.assert_array_equal(out, x.max(axis=1))
    np.testing.assert_array_equal(idx, x.argmax(axis=1))
    dy = rng.standard_normal(6).astype(dtype)
    dx = np.full(x.shape, np.nan, dtype)
    pooling2d.global_max_backward(dy, idx, dx)
    ref = np.zeros(x.shape, dtype)
    ref[np.arange(6), x.argmax(axis=1)] = dy
    np.testing.assert_array_equal(dx, ref)


def check_global_avg(dtype, rng):
    x = rng.standard_normal((6, 10)).astype(dtype)
    out = np.empty(6, dtype)
    pooling2d.global_avg_forward(x, out)
    np.testing.assert_allclose(out, x.astype(np.float64).mean(axis=1), **tol(dtype))
    dy = rng.standard_normal(6).astype(dtype)
    dx = np.full(x.shape, np.nan, dtype)
    pooling2d.global_avg_backward(dy, dx)
    np.testing.assert_allclose(dx, np.repeat(dy[:, None] / 10, 10, axis=1), **tol(dtype))


def bn_data(dtype, rng, shape=(4, 3, 5)):
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    gamma = rng.standard_normal(shape[1]).astype(dtype)
    beta = rng.standard_normal(shape[1]).astype(dtype)
    return x, gamma, beta


def check_bn_train_forward(dtype, rng):
    x, gamma, beta = bn_data(dtype, rng)
    c = x.shape[1]
    rm, rv = np.full(c, 0.5, dtype), np.full(c, 2.0, dtype)
    xhat, out, inv = np.empty_like(x), np.empty_like(x), np.empty(c, dtype)
    batch_normalization.bn_train_forward(x, gamma, beta, xhat, out, inv, rm, rv, 1e-3, 0.9, True)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 2)), x64.var(axis=(0, 2))
    ref_xhat = (x64 - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-3)
    np.testing.assert_allclose(xhat, ref_xhat, **tol(dtype))
    np.testing.assert_allclose(out, gamma[None, :, None] * ref_xhat + beta[None, :, None], **tol(dtype))
    np.testing.assert_allclose(inv, 1 / np.sqrt(var + 1e-3), **tol(dtype))
    np.testing.assert_allclose(rm, 0.9 * 0.5 + 0.1 * mean, **tol(dtype))
    np.testing.assert_allclose(rv, 0.9 * 2.0 + 0.1 * var, **tol(dtype))


def check_bn_eval_forward(dtype, rng):
    x, gamma, beta = bn_data(dtype, rng)
    rm, rv = rng.standard_normal(3).astype(dtype), (rng.random(3) + 0.5).astype(dtype)
    out = np.empty_like(x)
    batch_normalization.bn_eval_forward(x, gamma, beta, rm, rv, 1e-3, out)
    ref = gamma[None, :, None] * (x - rm[None, :, None]) / np.sqrt(rv[None, :, None] + 1e-3) + beta[None, :, None]
    np.testing.assert_allclose(out, ref, **tol(dtype))


def check_bn_param_grad(dtype, rng):
    dy, _, _ = bn_data(dtype, rng)
    xhat = rng.standard_normal(dy.shape).astype(dtype)
    dg, db = np.empty(3, dtype), np.empty(3, dtype)
    batch_normalization.bn_param_grad(dy, xhat, dg, db)
    np.testing.assert_allclose(dg, (dy.astype(np.float64) * xhat).sum(axis=(0, 2)), **tol(dtype))
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=(0, 2)), **tol(dtype))


def check_bn_train_backward(dtype, rng):
    """Against the derivative of the numpy forward, composed step by step (mean, var, x_hat)."""
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
    batch_normalization.bn_train_backward(dy, xhat.astype(dtype), gamma, inv.reshape(-1).astype(dtype), dx)
    np.testing.assert_allclose(dx, ref, **tol(dtype))


def check_bn_frozen_backward(dtype, rng):
    dy, gamma, _ = bn_data(dtype, rng)
    rv = (rng.random(3) + 0.5).astype(dtype)
    dx = np.empty_like(dy)
    batch_normalization.bn_frozen_backward(dy, gamma, rv, 1e-3, dx)
    np.testing.assert_allclose(dx, dy * (gamma / np.sqrt(rv + 1e-3))[None, :, None], **tol(dtype))


def splitmix64_reference(z: int) -> int:
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def check_splitmix64(dtype, rng):
    for z in (0, 1, 12345, 2**63 + 17, 2**64 - 1):
        assert int(counter_rng.splitmix64(np.uint64(z))) == splitmix64_reference(z)


def check_counter_stream(dtype, rng):
    """Draw i of the stream at key: splitmix64(key + (i + 1) * golden), mod 2^64; uniform01 its top 53 bits."""
    mask = (1 << 64) - 1
    for key in (0, 7, 2**64 - 1):
        for i in (0, 1, 1000, 2**40):
            z = splitmix64_reference((key + (i + 1) * 0x9E3779B97F4A7C15) & mask)
            assert int(counter_rng.counter_hash(np.uint64(key), i)) == z
            assert counter_rng.uniform01(np.uint64(key), i) == (z >> 11) / 2.0**53
    u = np.array([counter_rng.uniform01(np.uint64(3), i) for i in range(20000)])
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01


def check_dropout(dtype, rng):
    """Mask rate near 1 - p, out = x * mask / (1 - p), same seed same mask, other seed other mask."""
    x = (rng.random(20000) + 0.5).astype(dtype)
    out, mask, mask2 = np.empty_like(x), np.empty(x.size, np.uint8), np.empty(x.size, np.uint8)
    dropout.dropout_forward(x, out, mask, 0.3, np.uint64(42))
    assert abs(mask.mean() - 0.7) < 0.02
    np.testing.assert_allclose(out, x * mask / 0.7, **tol(dtype))
    dropout.dropout_forward(x, np.empty_like(x), mask2, 0.3, np.uint64(42))
    np.testing.assert_array_equal(mask, mask2)
    dropout.dropout_forward(x, np.empty_like(x), mask2, 0.3, np.uint64(43))
    assert (mask != mask2).mean() > 0.3
    dy = rng.standard_normal(x.size).astype(dtype)
    dx = np.empty_like(dy)
    dropout.dropout_backward(dy, mask, 0.3, dx)
    np.testing.assert_allclose(dx, dy * mask / 0.7, **tol(dtype))


def check_activation(dtype, rng):
    """The elementwise activations and row softmax (forward and backward) against numpy."""
    x = rng.standard_normal(50).astype(dtype) * 3
    dy = rng.standard_normal(50).astype(dtype)
    refs = {
        "relu": (np.maximum(x, 0), lambda y: dy * (y > 0)),
        "sigmoid": (1 / (1 + np.exp(-x.astype(np.float64))), lambda y: dy * y * (1 - y)),
        "tanh": (np.tanh(x), lambda y: dy * (1 - y * y)),
    }
    for name, (fwd, bwd) in activation.ELEMENTWISE.items():
        y = np.empty_like(x)
        fwd(x, y)
        np.testing.assert_allclose(y, refs[name][0], **tol(dtype))
        dx = np.empty_like(x)
        bwd(y, dy, dx)
        np.testing.assert_allclose(dx, refs[name][1](y), **tol(dtype))
    x2, dy2 = x.reshape(5, 10), dy.reshape(5, 10)
    y2 = np.empty_like(x2)
    activation.softmax_forward(x2, y2)
    e = np.exp(x2.astype(np.float64) - x2.max(axis=1, keepdims=True))
    np.testing.assert_allclose(y2, e / e.sum(axis=1, keepdims=True), **tol(dtype))
    dx2 = np.empty_like(x2)
    activation.softmax_backward(y2, dy2, dx2)
    np.testing.assert_allclose(dx2, y2 * (dy2 - (dy2 * y2).sum(axis=1, keepdims=True)), **tol(dtype))


KERNEL_CHECKS: dict[str, Callable[[type, np.random.Generator], None]] = {
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
}
CHECKS = sorted({f.__name__: f for f in KERNEL_CHECKS.values()}.items())


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "check"), CHECKS, ids=[n for n, _ in CHECKS])
def test_kernel_matches_numpy_reference(name: str, check, dtype) -> None:
    check(dtype, np.random.default_rng(0))


def test_every_kernel_has_a_reference_check() -> None:
    kernels = {
        name
        for module in MODULES
        for name, obj in vars(module).items()
        if isinstance(obj, CPUDispatcher) and obj.__module__ == module.__name__
    }
    assert kernels <= set(KERNEL_CHECKS), f"kernels without a reference check: {sorted(kernels - set(KERNEL_CHECKS))}"


@pytest.mark.parametrize(
    "name", ["im2col", "col2im", "max_pool_forward", "avg_pool_forward", "bn_train_forward", "dropout_forward"]
)
def test_hot_kernels_refuse_other_dtypes(name: str) -> None:
    """Explicit signatures: a float16 array is an error, not a silent recompilation."""
    module = next(m for m in MODULES if hasattr(m, name))
    kernel = getattr(module, name)
    assert len(kernel.signatures) == 2 and not kernel._can_compile
