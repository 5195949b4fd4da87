"""2-D convolution over NCHW data: im2col over tiles of samples + BLAS products (np.matmul).

Weight (filters, channels, kh, kw), bias (filters,). Shapes: K = C*kh*kw rows of columns,
P = OH*OW output positions per sample, W2 = weight viewed as (F, K).

The column buffer holds one tile of T samples side by side, (K, T*P): T = 1 for big layers, more
for small ones (enough for 1024 columns, or all that fit COL_TILE_BYTES) -- never the batch as such.
Side by side, a tile is ONE wide product, so small-spatial layers get large GEMMs and W2 is
packed once per tile, not per sample; a tile of one sample needs no packing at all.
- forward: col = im2col(x tile); out tile = W2 @ col (unpacked from (F, T*P) when T > 1) + b.
- dW: dW = dy_tile @ col^T summed over tiles, written straight into the gradient: the first tile's
  product is the gradient, later tiles add theirs through `wgrad_part` (F, K), which exists only
  when the batch takes more than one tile. (An earlier version summed col @ dy^T, (K, F), in a
  weight-sized accumulator and transposed it into the gradient: two weight-sized scratch tensors
  where this needs at most one; both product shapes run at the same speed on OpenBLAS.) With
  micro-batching the gradient is the accumulator itself: every tile's product is added, through
  a `wgrad_part` of at most PART_BYTES (a block of filters at a time).
- dx: col = W2^T @ dy_tile, then col2im. (A stride-1 alternative, im2col of dy times the flipped
  kernel, measured ~10% slower once tiles made this product wide, so it is not used.)

Kernels (KERNELS; numba twins in fedpers.nn.jit.conv2d): im2col and col2im loop over the kh*kw
kernel offsets, each one strided numpy copy or add over the whole tile; pack/unpack are one
transposing copy.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..order import Life
from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import add_bias, for_backend  # noqa: F401  (add_bias: part of this kernel namespace)
from .window import offset_block, output_size, resolve_padding

KERNELS = ("im2col", "col2im", "pack_tile", "unpack_tile", "bias_grad", "add_bias")
COL_TILE_BYTES = 1 << 20  # a tile takes as many samples as fit 1 MiB of columns...
MIN_TILE_COLUMNS = 1024  # ...or enough for 1024 columns side by side (small-spatial layers)...
COL_TILE_MAX_BYTES = 4 << 20  # ...but never more than 4 MiB of columns
PART_BYTES = 1 << 20  # micro-batching: dW products are added to the accumulator a block of filters at a time


@lru_cache(maxsize=256)
def _offsets(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, oh: int, ow: int, h: int, w: int):
    """Per kernel offset (ki, kj), row-major: its index, the output block it reads real input for
    ((i0, i1), (j0, j1)) and the input rows and columns of that block; None for no block."""
    out = []
    for ki in range(kh):
        rows = offset_block(ki, sh, ph, h, oh)
        for kj in range(kw):
            cols = offset_block(kj, sw, pw, w, ow)
            out.append((ki * kw + kj, rows, cols) if rows and cols else (ki * kw + kj, None, None))
    return tuple(out)


def _col_view(col: np.ndarray, t_stride: int, r_stride: int, tile: int, c_in: int, kh: int, kw: int, oh: int,
              ow: int) -> np.ndarray:
    """Flat `col` as (T, C, kh, kw, OH, OW): element (t, (c, ki, kj), (i, j)) of the layout."""
    it = col.itemsize
    return as_strided(col, shape=(tile, c_in, kh, kw, oh, ow),
                      strides=(t_stride * it, kh * kw * r_stride * it, kw * r_stride * it, r_stride * it, ow * it, it))


def padded_extent(h: int, w: int, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, oh: int,
                  ow: int) -> tuple[int, int] | None:
    """(rows, columns) of the zero-padded input the windows read, or None when they read inside x only."""
    hp, wp = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    if not (ph or pw) and hp <= h and wp <= w:
        return None
    return hp, wp


def im2col(x, col, t_stride, r_stride, kh, kw, sh, sw, ph, pw, oh, ow, *, padded=None) -> None:
    """x (T, C, H, W) -> flat col: element (t, r=(c, ki, kj), (i, j)) at t*t_stride + r*r_stride + i*ow + j
    is x[t, c, i*sh+ki-ph, j*sw+kj-pw], or 0 outside x. Side-by-side layout (K, T*P): t_stride = P,
    r_stride = T*P.

    One strided copy of every window: from x itself, or -- when the windows reach into the padding --
    from `padded`, a scratch of at least T*C*hp*wp elements (padded_extent) that gets x with a zero
    border. Without that scratch, one copy per kernel offset with the padding zeroed around it."""
    tile, c_in, h, w = x.shape
    view = _col_view(col, t_stride, r_stride, tile, c_in, kh, kw, oh, ow)
    extent = padded_extent(h, w, kh, kw, sh, sw, ph, pw, oh, ow)
    if extent is None or padded is not None:
        src = x
        if extent is not None:
            hp, wp = extent
            src = padded.reshape(-1)[: tile * c_in * hp * wp].reshape(tile, c_in, hp, wp)
            rows, cols = min(h, hp - ph), min(w, wp - pw)  # of x: the rest is never read
            src[:, :, :ph].fill(0.0)
            src[:, :, ph + rows :].fill(0.0)
            src[:, :, ph : ph + rows, :pw].fill(0.0)
            src[:, :, ph : ph + rows, pw + cols :].fill(0.0)
            np.copyto(src[:, :, ph : ph + rows, pw : pw + cols], x[:, :, :rows, :cols])
        st, sc, sy, sx = src.strides
        windows = as_strided(src, shape=(tile, c_in, kh, kw, oh, ow), strides=(st, sc, sy, sx, sy * sh, sx * sw))
        np.copyto(view, windows)
        return
    for r, rows, cols in _offsets(kh, kw, sh, sw, ph, pw, oh, ow, h, w):
        dst = view[:, :, r // kw, r % kw]
        if rows is None:
            dst.fill(0.0)
            continue
        (i0, i1, rs), (j0, j1, cs) = rows, cols
        if i0 > 0:
            dst[:, :, :i0].fill(0.0)
        if i1 < oh:
            dst[:, :, i1:].fill(0.0)
        if j0 > 0:
            dst[:, :, i0:i1, :j0].fill(0.0)
        if j1 < ow:
            dst[:, :, i0:i1, j1:].fill(0.0)
        np.copyto(dst[:, :, i0:i1, j0:j1], x[:, :, rs, cs])


def col2im(col, dx, t_stride, r_stride, kh, kw, sh, sw, ph, pw, oh, ow) -> None:
    """The adjoint of im2col (same layout arguments): dx (T, C, H, W) = sum of the column entries
    taken from each position."""
    tile, c_in, h, w = dx.shape
    view = _col_view(col, t_stride, r_stride, tile, c_in, kh, kw, oh, ow)
    dx.fill(0.0)
    for r, rows, cols in _offsets(kh, kw, sh, sw, ph, pw, oh, ow, h, w):
        if rows is None:
            continue
        (i0, i1, rs), (j0, j1, cs) = rows, cols
        d = dx[:, :, rs, cs]
        np.add(d, view[:, :, r // kw, r % kw, i0:i1, j0:j1], out=d)


def pack_tile(src: np.ndarray, dst: np.ndarray) -> None:
    """src (T, F, P) -> dst (F, T*P): samples side by side."""
    tile, f_out, p = src.shape
    np.copyto(dst.reshape(f_out, tile, p), src.transpose(1, 0, 2))


def unpack_tile(src: np.ndarray, dst: np.ndarray) -> None:
    """src (F, T*P) -> dst (T, F, P): the inverse of pack_tile."""
    tile, f_out, p = dst.shape
    np.copyto(dst, src.reshape(f_out, tile, p).transpose(1, 0, 2))


def bias_grad(dy: np.ndarray, db: np.ndarray) -> None:
    """db[f] = sum over samples and positions of dy (N, F, P)."""
    np.sum(dy, axis=(0, 2), out=db)


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


_THIS = sys.modules[__name__]


def conv2d_forward(x, w, b, out, col, wide, geo: ConvGeometry, k: ModuleType = _THIS, padded=None) -> None:
    """out (N, F, OH, OW) = conv(x (N, C, H, W), w (F, C, kh, kw)) + b, with kernels from `k`.

    col: the tile's columns (K*T*P elements; None when pointwise); wide: (F, T*P) product of a
    tile of several samples, unpacked into out (None when T = 1); padded: the numpy im2col's
    zero-padded input tile (None: none needed, or the numba kernels).
    """
    f_out, c_in, kh, kw = w.shape
    n_b = x.shape[0]
    oh, ow = out.shape[2:]
    p = oh * ow
    kk = c_in * kh * kw
    w2 = w.reshape(f_out, kk)
    out3 = out.reshape(n_b, f_out, p)
    if geo.pointwise:
        np.matmul(w2, x.reshape(n_b, c_in, p), out=out3)
        k.add_bias(out3, b)
        return
    tile = col.size // (kk * p)
    (sh, sw), (pt, _, pl, _) = geo.stride, geo.pads
    for a, z in tiles(n_b, tile):
        t = z - a
        k.im2col(x[a:z], col.reshape(-1), p, t * p, kh, kw, sh, sw, pt, pl, oh, ow, **_padded(padded))
        if t == 1:
            np.matmul(w2, side_by_side(col, kk, 1, p), out=out3[a])
        else:
            o = side_by_side(wide, f_out, t, p)
            np.matmul(w2, side_by_side(col, kk, t, p), out=o)
            k.unpack_tile(o, out3[a:z])
        k.add_bias(out3[a:z], b)


def conv2d_weight_grad(x, dy, gw, gb, col, pack, part, geo: ConvGeometry, k: ModuleType = _THIS,
                       padded=None, accumulate: bool = False, bias_part=None) -> None:
    """gw = sum over tiles of dy_tile @ col_tile^T, gb = sum dy; with `accumulate`, both are added to
    what gw and gb hold.

    col: tile columns (None when pointwise: one sample at a time straight from x); pack: dy of a
    tile side by side, (F, T*P) (None when T = 1); part: (rows, K), the products that are added,
    a block of `rows` filters at a time (None when nothing is added: one tile, not accumulating);
    padded: as in conv2d_forward; bias_part: (F,), this batch's bias gradient when accumulating.
    """
    f_out, c_in, kh, kw = gw.shape
    n_b = x.shape[0]
    oh, ow = dy.shape[2:]
    p = oh * ow
    kk = c_in * kh * kw
    dy3 = dy.reshape(n_b, f_out, p)
    gw2 = gw.reshape(f_out, kk)
    tile = 1 if geo.pointwise else col.size // (kk * p)
    (sh, sw), (pt, _, pl, _) = geo.stride, geo.pads
    for a, z in tiles(n_b, tile):
        t = z - a
        if geo.pointwise:
            c = x[a].reshape(c_in, p)
        else:
            k.im2col(x[a:z], col.reshape(-1), p, t * p, kh, kw, sh, sw, pt, pl, oh, ow, **_padded(padded))
            c = side_by_side(col, kk, t, p)
        if t == 1:
            d = dy3[a]
        else:
            d = side_by_side(pack, f_out, t, p)
            k.pack_tile(dy3[a:z], d)
        if a == 0 and not accumulate:
            np.matmul(d, c.T, out=gw2)
            continue
        rows = part.shape[0]
        for f0 in range(0, f_out, rows):
            f1 = min(f0 + rows, f_out)
            np.matmul(d[f0:f1], c.T, out=part[: f1 - f0])
            np.add(gw2[f0:f1], part[: f1 - f0], out=gw2[f0:f1])
    if accumulate:
        k.bias_grad(dy3, bias_part)
        np.add(gb, bias_part, out=gb)
    else:
        k.bias_grad(dy3, gb)


def conv2d_input_grad(dy, w, dx, col, wide, geo: ConvGeometry, k: ModuleType = _THIS) -> None:
    """dx = d conv / d x applied to dy, a tile at a time: col = W2^T @ dy tile, then col2im.

    col: the tile's columns (None when pointwise: dx = W2^T @ dy directly); wide: dy of a tile
    side by side, (F, T*P) (None when T = 1).
    """
    f_out, c_in, kh, kw = w.shape
    n_b = dx.shape[0]
    oh, ow = dy.shape[2:]
    p, kk = oh * ow, c_in * kh * kw
    dy3 = dy.reshape(n_b, f_out, p)
    if geo.pointwise:
        np.matmul(w.reshape(f_out, c_in).T, dy3, out=dx.reshape(n_b, c_in, p))
        return
    (sh, sw), (pt, _, pl, _) = geo.stride, geo.pads
    w2t = w.reshape(f_out, kk).T
    for a, z in tiles(n_b, col.size // (kk * p)):
        t = z - a
        if t == 1:
            d = dy3[a]
        else:
            d = side_by_side(wide, f_out, t, p)
            k.pack_tile(dy3[a:z], d)
        np.matmul(w2t, d, out=side_by_side(col, kk, t, p))
        k.col2im(col.reshape(-1), dx[a:z], p, t * p, kh, kw, sh, sw, pt, pl, oh, ow)


def _padded(buf: np.ndarray | None) -> dict:
    return {} if buf is None else {"padded": buf}


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
        self.k = for_backend(__name__, ctx.kernels)
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
        self.col = self.wide = self.col_grad = self.pack = self.part = None
        self.col_deriv = self.wide_deriv = self.padded = self.padded_grad = None
        t = 1
        if not pointwise:
            t = tile_size(ctx.batch, k * p, p)
            self.col = ctx.request_tensor("col", (k, t * p), Life.FORWARD)
            extent = padded_extent(h, w, kh, kw, *stride, pads[0], pads[2], oh, ow)
            if ctx.kernels == "numpy" and extent is not None:  # the numpy im2col's zero-padded input tile
                self.padded = ctx.request_tensor("x_padded", (t, c_in, *extent), Life.FORWARD)
                if spec.trainable:
                    self.padded_grad = ctx.request_tensor("x_padded_grad", (t, c_in, *extent), Life.CALC_GRAD)
            if t > 1:
                self.wide = ctx.request_tensor("out_tile", (f_out, t * p), Life.FORWARD)
            if spec.trainable:
                self.col_grad = ctx.request_tensor("col_grad", (k, t * p), Life.CALC_GRAD)
                if t > 1:
                    self.pack = ctx.request_tensor("dy_tile", (f_out, t * p), Life.CALC_GRAD)
            self.col_deriv = ctx.request_tensor("col_deriv", (k, t * p), Life.CALC_DERIV)
            if t > 1:
                self.wide_deriv = ctx.request_tensor("dy_tile_deriv", (f_out, t * p), Life.CALC_DERIV)
        self.bias_part = None
        if spec.trainable and ctx.accumulates:  # every tile's product is added, a block at a time
            rows = max(1, min(f_out, PART_BYTES // (4 * k)))
            self.part = ctx.request_tensor("wgrad_part", (rows, k), Life.CALC_GRAD)
            self.bias_part = ctx.request_tensor("bgrad_part", (f_out,), Life.CALC_GRAD)
        elif spec.trainable and ctx.batch > t:  # more than one tile: later tiles' dW products
            self.part = ctx.request_tensor("wgrad_part", (f_out, k), Life.CALC_GRAD)
        ctx.input_life = Life.CALC_GRAD  # dW needs the columns of x again
        return (ctx.batch, f_out, oh, ow)

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        conv2d_forward(
            x, run.weight(self.w), run.weight(self.b), out, _opt(run, self.col), _opt(run, self.wide), self.geo, self.k,
            _opt(run, self.padded),
        )

    def calc_gradient(self, run: RunContext) -> None:
        gw, gb = run.grad(self.w), run.grad(self.b)
        if gw is None or gb is None:
            return
        conv2d_weight_grad(
            run.input(), run.dout(), gw, gb,
            _opt(run, self.col_grad), _opt(run, self.pack), _opt(run, self.part), self.geo, self.k,
            _opt(run, self.padded_grad), run.accumulate, _opt(run, self.bias_part),
        )  # fmt: skip

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is None:
            return
        conv2d_input_grad(
            run.dout(), run.weight(self.w), din,
            _opt(run, self.col_deriv), _opt(run, self.wide_deriv), self.geo, self.k,
        )  # fmt: skip


def _opt(run: RunContext, k: int | None) -> np.ndarray | None:
    """A scratch view, or None when the layer did not request it."""
    return None if k is None else run.tensor(k)
