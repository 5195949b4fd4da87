"""2-D convolution over NCHW data: tiled im2col (numba) + batched BLAS products (np.matmul).

Weight (filters, channels, kh, kw), bias (filters,). Forward: col[t] = im2col(x[n]) is
(C*kh*kw, OH*OW) and out[n] = W2 @ col[t] with W2 = W viewed as (F, C*kh*kw). The column buffer
holds one tile of samples: as many as fit COL_TILE_BYTES, at least one -- never the batch. A tile
of several samples only saves Python calls on small layers; big layers run one sample at a time.
Backward:
- dW^T = sum_n col_n @ dy_n^T, summed per tile into a weight-sized (K, F) scratch (this product
  shape measured fastest on OpenBLAS), transposed into the gradient at the end;
- dx for stride 1 is a stride-1 convolution of dy with the flipped, transposed kernel
  (im2col of dy + one product with a reduction of F*kh*kw), which avoids both the low-reduction
  product W2^T @ dy and the scatter of col2im; other strides use W2^T @ dy + col2im.
Index arithmetic in the kernels is unsigned so numba drops negative-index checks and vectorizes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

from ..order import Life
from ..spec import Padding
from .base import InitContext, Layer, RunContext, Shape, register

DTYPES = ("float32", "float64")  # float32 is what runs; float64 serves the gradient checks
REDUCE = {"reassoc", "nsz"}  # lets LLVM vectorize sums (order of additions may change); nothing else
COL_TILE_BYTES = 1 << 20  # column buffer budget: a tile of samples up to 1 MiB, else one sample


def signatures(template: str) -> list[str]:
    """One explicit signature per dtype from a template with `{t}` for the float type."""
    return [template.format(t=t) for t in DTYPES]


def resolve_padding(
    padding: Padding | None, size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding; 'same' pads as Keras/NNTrainer (extra on bottom/right)."""
    if padding is None or padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for n, k, s in zip(size, kernel, stride, strict=True):
            out = -(-n // s)
            total = max((out - 1) * s + k - n, 0)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    ph, pw = padding
    return (ph, ph, pw, pw)


def output_size(n: int, k: int, s: int, before: int, after: int) -> int:
    return (n + before + after - k) // s + 1


@njit(
    signatures("void({t}[:,:,:,::1], {t}[:,:,::1], int64, int64, int64, int64, int64, int64, int64, int64)"),
    cache=True,
    nogil=True,
)
def im2col(x, col, kh, kw, sh, sw, ph, pw, oh, ow):
    """x (T, C, H, W) -> col (T, C*kh*kw, oh*ow): col[t, (c, ki, kj), (i, j)] = x[t, c, i*sh+ki-ph, j*sw+kj-pw] or 0."""
    tile, c_in, h, w = x.shape
    xf = x.reshape(x.size)
    cf = col.reshape(col.size)
    p = oh * ow
    k_rows = c_in * kh * kw
    usw = uint64(sw)
    for t in range(tile):
        for c in range(c_in):
            for ki in range(kh):
                for kj in range(kw):
                    row = (t * k_rows + (c * kh + ki) * kw + kj) * p
                    off = kj - pw
                    # columns j with 0 <= j*sw + off < w
                    j0 = 0 if off >= 0 else min((-off + sw - 1) // sw, ow)
                    j1 = min((w - 1 - off) // sw + 1, ow) if w - 1 - off >= 0 else 0
                    if j1 < j0:
                        j1 = j0
                    for i in range(oh):
                        ih = i * sh + ki - ph
                        o = uint64(row + i * ow)
                        if ih < 0 or ih >= h:
                            for j in range(ow):
                                cf[o + uint64(j)] = 0.0
                            continue
                        for j in range(j0):
                            cf[o + uint64(j)] = 0.0
                        src = uint64(((t * c_in + c) * h + ih) * w + off + j0 * sw)
                        dst = o + uint64(j0)
                        if sw == 1:
                            for j in range(j1 - j0):
                                cf[dst + uint64(j)] = xf[src + uint64(j)]
                        else:
                            for j in range(j1 - j0):
                                cf[dst + uint64(j)] = xf[src + uint64(j) * usw]
                        for j in range(j1, ow):
                            cf[o + uint64(j)] = 0.0


@njit(
    signatures("void({t}[:,:,::1], {t}[:,:,:,::1], int64, int64, int64, int64, int64, int64, int64, int64)"),
    cache=True,
    nogil=True,
)
def col2im(col, dx, kh, kw, sh, sw, ph, pw, oh, ow):
    """The adjoint of im2col: dx (T, C, H, W) = sum of col entries over the positions they came from."""
    tile, c_in, h, w = dx.shape
    xf = dx.reshape(dx.size)
    cf = col.reshape(col.size)
    p = oh * ow
    k_rows = c_in * kh * kw
    usw = uint64(sw)
    for k in range(xf.size):
        xf[k] = 0.0
    for t in range(tile):
        for c in range(c_in):
            for ki in range(kh):
                for kj in range(kw):
                    row = (t * k_rows + (c * kh + ki) * kw + kj) * p
                    off = kj - pw
                    j0 = 0 if off >= 0 else min((-off + sw - 1) // sw, ow)
                    j1 = min((w - 1 - off) // sw + 1, ow) if w - 1 - off >= 0 else 0
                    if j1 < j0:
                        j1 = j0
                    for i in range(oh):
                        ih = i * sh + ki - ph
                        if ih < 0 or ih >= h:
                            continue
                        dst = uint64(((t * c_in + c) * h + ih) * w + off + j0 * sw)
                        src = uint64(row + i * ow + j0)
                        if sw == 1:
                            for j in range(j1 - j0):
                                xf[dst + uint64(j)] += cf[src + uint64(j)]
                        else:
                            for j in range(j1 - j0):
                                xf[dst + uint64(j) * usw] += cf[src + uint64(j)]


@njit(signatures("void({t}[:,:,:,::1], {t}[:,::1])"), cache=True, nogil=True)
def flip_kernel(w, wf):
    """wf (C, F*kh*kw)[c, (f, u, v)] = w[f, c, kh-1-u, kw-1-v]: the kernel of the stride-1 input derivative."""
    f_out, c_in, kh, kw = w.shape
    for c in range(c_in):
        for f in range(f_out):
            for u in range(kh):
                for v in range(kw):
                    wf[c, (f * kh + u) * kw + v] = w[f, c, kh - 1 - u, kw - 1 - v]


@njit(signatures("void({t}[:,:,::1], {t}[::1])"), cache=True, nogil=True)
def add_bias(out, b):
    """out (T, F, P) += b[None, :, None]."""
    tile, f_out, p = out.shape
    for t in range(tile):
        for f in range(f_out):
            v = b[f]
            for j in range(p):
                out[t, f, j] += v


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


@njit(signatures("void({t}[:,:,::1], {t}[:,::1], boolean)"), cache=True, nogil=True)
def sum_tile(parts, acc, first):
    """acc (K, F) = (0 if first else acc) + sum over the tile of parts (T, K, F)."""
    tile, k_rows, f_out = parts.shape
    for k in range(k_rows):
        for f in range(f_out):
            s = 0.0 if first else acc[k, f]
            for t in range(tile):
                s += parts[t, k, f]
            acc[k, f] = s


def tiles(n: int, tile: int):
    """(start, stop) of consecutive tiles of at most `tile` samples covering n."""
    return ((a, min(a + tile, n)) for a in range(0, n, tile))


def conv2d_forward(x, w, b, out, col, stride, pads) -> None:
    """out (N, F, OH, OW) = conv(x (N, C, H, W), w (F, C, kh, kw)) + b.

    col (T, C*kh*kw, OH*OW) holds the columns of one tile of T samples (None for pointwise kernels);
    one batched product W2 @ col[t] per tile writes straight into out.
    """
    f_out, c_in, kh, kw = w.shape
    n_b = x.shape[0]
    oh, ow = out.shape[2:]
    w2 = w.reshape(f_out, -1)
    out3 = out.reshape(n_b, f_out, oh * ow)
    if col is None:  # pointwise: x itself is the column matrix
        np.matmul(w2, x.reshape(n_b, c_in, -1), out=out3)
        add_bias(out3, b)
        return
    for a, z in tiles(n_b, col.shape[0]):
        c = col[: z - a]
        im2col(x[a:z], c, kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow)
        np.matmul(w2, c, out=out3[a:z])
        add_bias(out3[a:z], b)


def conv2d_weight_grad(x, dy, gw, gb, col, parts, acc, stride, pads) -> None:
    """gw = sum_n dy_n @ col_n^T, gb = sum dy.

    Per tile: parts[t] = col[t] @ dy[t]^T (K, F) (this product shape measured fastest on OpenBLAS),
    summed into acc (K, F); acc^T is copied into gw at the end. col is None for pointwise kernels.
    """
    f_out, c_in, kh, kw = gw.shape
    n_b = x.shape[0]
    oh, ow = dy.shape[2:]
    dy3 = dy.reshape(n_b, f_out, oh * ow)
    for a, z in tiles(n_b, parts.shape[0]):
        if col is None:
            c = x[a:z].reshape(z - a, c_in, -1)
        else:
            c = col[: z - a]
            im2col(x[a:z], c, kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow)
        np.matmul(c, dy3[a:z].transpose(0, 2, 1), out=parts[: z - a])
        sum_tile(parts[: z - a], acc, a == 0)
    np.copyto(gw.reshape(f_out, -1), acc.T)
    bias_grad(dy3, gb)


def conv2d_input_grad(dy, w, dx, col, wf, stride, pads, flipped: bool) -> None:
    """dx = d conv / d x applied to dy; col (tile-sized) and (flipped) wf are scratch.

    flipped: dx as a stride-1 convolution of dy with the flipped kernel wf (stride 1 only):
    im2col of dy, then dx[t] = wf @ col[t], a product that reduces over F*kh*kw.
    Otherwise col[t] = W2^T @ dy[t], then col2im. Pointwise kernels: dx = W2^T @ dy directly.
    """
    f_out, c_in, kh, kw = w.shape
    n_b, _, h, wd = dx.shape
    oh, ow = dy.shape[2:]
    dy3 = dy.reshape(n_b, f_out, oh * ow)
    dx3 = dx.reshape(n_b, c_in, h * wd)
    if col is None:
        np.matmul(w.reshape(f_out, c_in).T, dy3, out=dx3)
        return
    if flipped:
        flip_kernel(w, wf)
    for a, z in tiles(n_b, col.shape[0]):
        c = col[: z - a]
        if flipped:
            im2col(dy[a:z], c, kh, kw, 1, 1, kh - 1 - pads[0], kw - 1 - pads[2], h, wd)
            np.matmul(wf, c, out=dx3[a:z])
        else:
            np.matmul(w.reshape(f_out, -1).T, dy3[a:z], out=c)
            col2im(c, dx[a:z], kh, kw, stride[0], stride[1], pads[0], pads[2], oh, ow)


def use_flipped_derivative(c_in: int, f_out: int, stride: tuple[int, int]) -> bool:
    """Stride 1 and no more filters than channels: the flipped convolution's columns (F*kh*kw rows)
    are then no larger than col2im's and its product reduces over F*kh*kw instead of F."""
    return tuple(stride) == (1, 1) and f_out <= c_in


def tile_size(batch: int, col_elems: int) -> int:
    """Samples per tile: as many as fit COL_TILE_BYTES of float32 columns, at least one."""
    return max(1, min(batch, COL_TILE_BYTES // max(4 * col_elems, 1)))


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
        self.stride = tuple(spec.stride or (1, 1))
        self.pads = resolve_padding(spec.padding, (h, w), (kh, kw), self.stride)
        oh = output_size(h, kh, self.stride[0], self.pads[0], self.pads[1])
        ow = output_size(w, kw, self.stride[1], self.pads[2], self.pads[3])
        if oh <= 0 or ow <= 0:
            raise ctx.error("kernel_size", f"kernel {kh}x{kw} does not fit the padded {h}x{w} input")
        f_out = spec.filters
        k = c_in * kh * kw
        self.w = ctx.request_weight(
            "weight",
            (f_out, c_in, kh, kw),
            spec.weight_initializer or "xavier_uniform",
            fan_in=k,
            fan_out=f_out * kh * kw,
        )
        self.b = ctx.request_weight("bias", (f_out,), spec.bias_initializer or "zeros")
        pointwise = _is_pointwise((f_out, c_in, kh, kw), self.stride, self.pads)
        self.flipped = not pointwise and use_flipped_derivative(c_in, f_out, self.stride)
        # Scratch for one tile of samples, each only for the steps that use it (the planner may
        # overlap them): forward columns; backward columns of x (gradient) and of dy (derivative).
        self.col = self.col_grad = self.col_deriv = self.flip = self.parts = self.acc = None
        t_fwd = tile_size(ctx.batch, k * oh * ow)
        if not pointwise:
            self.col = ctx.request_tensor("col", (t_fwd, k, oh * ow), Life.FORWARD)
            rows, cols = (f_out * kh * kw, h * w) if self.flipped else (k, oh * ow)
            self.col_deriv = ctx.request_tensor(
                "col_deriv", (tile_size(ctx.batch, rows * cols), rows, cols), Life.CALC_DERIV
            )
            if self.flipped:
                self.flip = ctx.request_tensor("wflip", (c_in, f_out * kh * kw), Life.CALC_DERIV)
        if spec.trainable:
            if not pointwise:
                self.col_grad = ctx.request_tensor("col_grad", (t_fwd, k, oh * ow), Life.CALC_GRAD)
            self.parts = ctx.request_tensor("wgrad_parts", (t_fwd, k, f_out), Life.CALC_GRAD)
            self.acc = ctx.request_tensor("wgrad_acc", (k, f_out), Life.CALC_GRAD)
        ctx.input_life = Life.CALC_GRAD  # dW needs the columns of x again
        return (ctx.batch, f_out, oh, ow)

    def forward(self, run: RunContext, training: bool) -> None:
        conv2d_forward(
            run.input(),
            run.weight(self.w),
            run.weight(self.b),
            run.output(),
            _opt(run, self.col),
            self.stride,
            self.pads,
        )

    def calc_gradient(self, run: RunContext) -> None:
        gw, gb = run.grad(self.w), run.grad(self.b)
        if gw is None or gb is None:
            return
        conv2d_weight_grad(
            run.input(),
            run.dout(),
            gw,
            gb,
            _opt(run, self.col_grad),
            run.tensor(self.parts),
            run.tensor(self.acc),
            self.stride,
            self.pads,
        )

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is None:
            return
        conv2d_input_grad(
            run.dout(),
            run.weight(self.w),
            din,
            _opt(run, self.col_deriv),
            _opt(run, self.flip),
            self.stride,
            self.pads,
            self.flipped,
        )


def _opt(run: RunContext, k: int | None) -> np.ndarray | None:
    """A scratch view, or None when the layer did not request it (pointwise kernels need no columns)."""
    return None if k is None else run.tensor(k)
