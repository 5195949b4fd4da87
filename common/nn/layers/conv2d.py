"""2-D convolution over NCHW data: im2col (numba) over tiles of samples + BLAS products (np.matmul).

Weight (filters, channels, kh, kw), bias (filters,). Shapes: K = C*kh*kw rows of columns,
P = OH*OW output positions per sample, W2 = weight viewed as (F, K).

The column buffer holds one tile of T samples side by side, (K, T*P): T = 1 for big layers, more
for small ones (enough for 1024 columns, or all that fit COL_TILE_BYTES) -- never the batch as such.
Side by side, a tile is ONE wide product, so small-spatial layers get large GEMMs and W2 is
packed once per tile, not per sample; a tile of one sample needs no packing at all.
- forward: col = im2col(x tile); out tile = W2 @ col (unpacked from (F, T*P) when T > 1) + b.
- dW: dW^T = sum over tiles of col @ dy_tile^T, (K, F) (this product shape measured fastest on
  OpenBLAS), summed in a weight-sized scratch and transposed into the gradient.
- dx: col = W2^T @ dy_tile, then col2im. (A stride-1 alternative, im2col of dy times the flipped
  kernel, measured ~10% slower once tiles made this product wide, so it is not used.)
Index arithmetic in the kernels is unsigned so numba drops negative-index checks and vectorizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numba import njit, uint64

from ..order import Life
from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import REDUCE, add_bias, signatures
from .window import column_range, output_size, resolve_padding

COL_TILE_BYTES = 1 << 20  # a tile takes as many samples as fit 1 MiB of columns...
MIN_TILE_COLUMNS = 1024  # ...or enough for 1024 columns side by side (small-spatial layers)...
COL_TILE_MAX_BYTES = 4 << 20  # ...but never more than 4 MiB of columns


@njit(
    signatures("void({t}[:,:,:,::1], {t}[::1], int64, int64, int64, int64, int64, int64, int64, int64, int64, int64)"),
    cache=True,
    nogil=True,
)
def im2col(x, col, t_stride, r_stride, kh, kw, sh, sw, ph, pw, oh, ow):
    """x (T, C, H, W) -> flat col: element (t, r=(c, ki, kj), (i, j)) at t*t_stride + r*r_stride + i*ow + j
    is x[t, c, i*sh+ki-ph, j*sw+kj-pw], or 0 outside x. Side-by-side layout (K, T*P): t_stride = P,
    r_stride = T*P."""
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


@njit(
    signatures("void({t}[::1], {t}[:,:,:,::1], int64, int64, int64, int64, int64, int64, int64, int64, int64, int64)"),
    cache=True,
    nogil=True,
)
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


@njit(signatures("void({t}[:,:,::1], {t}[:,::1])"), cache=True, nogil=True)
def pack_tile(src, dst):
    """src (T, F, P) -> dst (F, T*P): samples side by side."""
    tile, f_out, p = src.shape
    for f in range(f_out):
        for t in range(tile):
            for j in range(p):
                dst[f, t * p + j] = src[t, f, j]


@njit(signatures("void({t}[:,::1], {t}[:,:,::1])"), cache=True, nogil=True)
def unpack_tile(src, dst):
    """src (F, T*P) -> dst (T, F, P): the inverse of pack_tile."""
    tile, f_out, p = dst.shape
    for t in range(tile):
        for f in range(f_out):
            for j in range(p):
                dst[t, f, j] = src[f, t * p + j]


@njit(signatures("void({t}[:,:,::1], {t}[::1])"), cache=True, nogil=True, fastmath=REDUCE)
def bias_grad(dy, db):
    """db[f] = sum over samples and positions of dy (N, F, P)."""
    n_b, f_out, p = dy.shape
    for f in range(f_out):
        s = 0.0
        for n in range(n_b):
            for j in range(p):
                s += dy[n, f, j]
        db[f] = s


@dataclass(frozen=True)
class ConvGeometry:
    """Stride and (top, bottom, left, right) padding of one conv layer."""

    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    pointwise: bool = False  # 1x1 kernel, stride 1, no padding: x itself is the column matrix


def tiles(n: int, tile: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive tiles of at most `tile` samples covering n."""
    return ((a, min(a + tile, n)) for a in range(0, n, tile))


def side_by_side(buf: np.ndarray, rows: int, t: int, cols: int) -> np.ndarray:
    """The leading (rows, t*cols) C-contiguous view of a tile buffer."""
    return buf.reshape(-1)[: rows * t * cols].reshape(rows, t * cols)


def conv2d_forward(x, w, b, out, col, wide, geo: ConvGeometry) -> None:
    """out (N, F, OH, OW) = conv(x (N, C, H, W), w (F, C, kh, kw)) + b.

    col: the tile's columns (K*T*P elements; None when pointwise); wide: (F, T*P) product of a
    tile of several samples, unpacked into out (None when T = 1).
    """
    f_out, c_in, kh, kw = w.shape
    n_b = x.shape[0]
    oh, ow = out.shape[2:]
    p = oh * ow
    k = c_in * kh * kw
    w2 = w.reshape(f_out, k)
    out3 = out.reshape(n_b, f_out, p)
    if geo.pointwise:
        np.matmul(w2, x.reshape(n_b, c_in, p), out=out3)
        add_bias(out3, b)
        return
    tile = col.size // (k * p)
    (sh, sw), (pt, _, pl, _) = geo.stride, geo.pads
    for a, z in tiles(n_b, tile):
        t = z - a
        im2col(x[a:z], col.reshape(-1), p, t * p, kh, kw, sh, sw, pt, pl, oh, ow)
        if t == 1:
            np.matmul(w2, side_by_side(col, k, 1, p), out=out3[a])
        else:
            o = side_by_side(wide, f_out, t, p)
            np.matmul(w2, side_by_side(col, k, t, p), out=o)
            unpack_tile(o, out3[a:z])
        add_bias(out3[a:z], b)


def conv2d_weight_grad(x, dy, gw, gb, col, pack, part, acc, geo: ConvGeometry) -> None:
    """gw = sum_n dy_n @ col_n^T and gb = sum dy, a tile at a time.

    col: tile columns (None when pointwise: one sample at a time straight from x); pack: dy of a
    tile side by side, (F, T*P) (None when T = 1); part, acc: (K, F).
    """
    f_out, c_in, kh, kw = gw.shape
    n_b = x.shape[0]
    oh, ow = dy.shape[2:]
    p = oh * ow
    k = c_in * kh * kw
    dy3 = dy.reshape(n_b, f_out, p)
    tile = 1 if geo.pointwise else col.size // (k * p)
    (sh, sw), (pt, _, pl, _) = geo.stride, geo.pads
    for a, z in tiles(n_b, tile):
        t = z - a
        if geo.pointwise:
            c = x[a].reshape(c_in, p)
        else:
            im2col(x[a:z], col.reshape(-1), p, t * p, kh, kw, sh, sw, pt, pl, oh, ow)
            c = side_by_side(col, k, t, p)
        if t == 1:
            d = dy3[a]
        else:
            d = side_by_side(pack, f_out, t, p)
            pack_tile(dy3[a:z], d)
        if a == 0:
            np.matmul(c, d.T, out=acc)
        else:
            np.matmul(c, d.T, out=part)
            acc += part
    np.copyto(gw.reshape(f_out, k), acc.T)
    bias_grad(dy3, gb)


def conv2d_input_grad(dy, w, dx, col, wide, geo: ConvGeometry) -> None:
    """dx = d conv / d x applied to dy, a tile at a time: col = W2^T @ dy tile, then col2im.

    col: the tile's columns (None when pointwise: dx = W2^T @ dy directly); wide: dy of a tile
    side by side, (F, T*P) (None when T = 1).
    """
    f_out, c_in, kh, kw = w.shape
    n_b = dx.shape[0]
    oh, ow = dy.shape[2:]
    p, k = oh * ow, c_in * kh * kw
    dy3 = dy.reshape(n_b, f_out, p)
    if geo.pointwise:
        np.matmul(w.reshape(f_out, c_in).T, dy3, out=dx.reshape(n_b, c_in, p))
        return
    (sh, sw), (pt, _, pl, _) = geo.stride, geo.pads
    w2t = w.reshape(f_out, k).T
    for a, z in tiles(n_b, col.size // (k * p)):
        t = z - a
        if t == 1:
            d = dy3[a]
        else:
            d = side_by_side(wide, f_out, t, p)
            pack_tile(dy3[a:z], d)
        np.matmul(w2t, d, out=side_by_side(col, k, t, p))
        col2im(col.reshape(-1), dx[a:z], p, t * p, kh, kw, sh, sw, pt, pl, oh, ow)


def tile_size(batch: int, sample_elems: int, cols: int) -> int:
    """Samples per tile: enough for MIN_TILE_COLUMNS side by side, or as many as fit COL_TILE_BYTES,
    never more than COL_TILE_MAX_BYTES (float32 columns) nor the batch; at least one."""
    sample_bytes = 4 * max(sample_elems, 1)
    want = max(COL_TILE_BYTES // sample_bytes, -(-MIN_TILE_COLUMNS // max(cols, 1)))
    return max(1, min(batch, want, COL_TILE_MAX_BYTES // sample_bytes))


def _is_pointwise(wshape, stride, pads) -> bool:
    """A 1x1 kernel, stride 1, no padding: the input itself is the column matrix."""
    return wshape[2] == 1 and wshape[3] == 1 and tuple(stride) == (1, 1) and not any(pads)


@register
class Conv2D(Layer):
    kind = "conv2d"
    has_weights = True

    def finalize(self, ctx: InitContext) -> Shape:
        spec = self.spec
        if spec.filters is None:
            raise ctx.error("filters", "a conv2d layer needs filters")
        if spec.kernel_size is None:
            raise ctx.error("kernel_size", "a conv2d layer needs kernel_size")
        (shape,) = ctx.input_shapes
        if len(shape) != 4:
            raise ctx.error("input_layers", f"conv2d needs a C:H:W input, got {shape[1:]}")
        _, c_in, h, w = shape
        kh, kw = spec.kernel_size
        stride = tuple(spec.stride or (1, 1))
        pads = resolve_padding(spec.padding, (h, w), (kh, kw), stride)
        oh = output_size(h, kh, stride[0], pads[0], pads[1])
        ow = output_size(w, kw, stride[1], pads[2], pads[3])
        if oh <= 0 or ow <= 0:
            raise ctx.error("kernel_size", f"kernel {kh}x{kw} does not fit the padded {h}x{w} input")
        f_out = spec.filters
        k, p = c_in * kh * kw, oh * ow
        pointwise = _is_pointwise((f_out, c_in, kh, kw), stride, pads)
        self.geo = ConvGeometry(stride, pads, pointwise)
        self.w = ctx.request_weight(
            "weight",
            (f_out, c_in, kh, kw),
            spec.weight_initializer or "xavier_uniform",
            fan_in=k,
            fan_out=f_out * kh * kw,
        )
        self.b = ctx.request_weight("bias", (f_out,), spec.bias_initializer or "zeros")
        # Scratch for one tile of samples, each only for the steps that use it (the planner may
        # overlap them): forward columns; columns of x for dW; columns of dx for dx.
        self.col = self.wide = self.col_grad = self.pack = self.part = self.acc = None
        self.col_deriv = self.wide_deriv = None
        if not pointwise:
            t = tile_size(ctx.batch, k * p, p)
            self.col = ctx.request_tensor("col", (k, t * p), Life.FORWARD)
            if t > 1:
                self.wide = ctx.request_tensor("out_tile", (f_out, t * p), Life.FORWARD)
            if spec.trainable:
                self.col_grad = ctx.request_tensor("col_grad", (k, t * p), Life.CALC_GRAD)
                if t > 1:
                    self.pack = ctx.request_tensor("dy_tile", (f_out, t * p), Life.CALC_GRAD)
            self.col_deriv = ctx.request_tensor("col_deriv", (k, t * p), Life.CALC_DERIV)
            if t > 1:
                self.wide_deriv = ctx.request_tensor("dy_tile_deriv", (f_out, t * p), Life.CALC_DERIV)
        if spec.trainable:
            self.part = ctx.request_tensor("wgrad_part", (k, f_out), Life.CALC_GRAD)
            self.acc = ctx.request_tensor("wgrad_acc", (k, f_out), Life.CALC_GRAD)
        ctx.input_life = Life.CALC_GRAD  # dW needs the columns of x again
        return (ctx.batch, f_out, oh, ow)

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        conv2d_forward(
            x, run.weight(self.w), run.weight(self.b), out, _opt(run, self.col), _opt(run, self.wide), self.geo
        )

    def calc_gradient(self, run: RunContext) -> None:
        gw, gb = run.grad(self.w), run.grad(self.b)
        if gw is None or gb is None:
            return
        conv2d_weight_grad(
            run.input(), run.dout(), gw, gb,
            _opt(run, self.col_grad), _opt(run, self.pack), run.tensor(self.part), run.tensor(self.acc), self.geo,
        )  # fmt: skip

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is None:
            return
        conv2d_input_grad(
            run.dout(), run.weight(self.w), din,
            _opt(run, self.col_deriv), _opt(run, self.wide_deriv), self.geo,
        )  # fmt: skip


def _opt(run: RunContext, k: int | None) -> np.ndarray | None:
    """A scratch view, or None when the layer did not request it."""
    return None if k is None else run.tensor(k)
