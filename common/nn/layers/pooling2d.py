"""2-D pooling over NCHW data: max, average, global_max, global_average.

Max pooling records, per output, the offset of its window's maximum (ki * kw + kj) in a uint8
scratch, so backward scatters dy there without keeping the input: one byte per output (an earlier
version kept a 4-byte flat position). Average pooling divides by the number of real (non-padding)
elements in the window, as Keras and NNTrainer do, and needs nothing saved. Global pooling reduces
each channel's whole plane to one value: output (N, C, 1, 1).

numpy kernels loop over the kh*kw window offsets (each one strided ufunc over every window) and
take boolean / float scratch for their comparisons; the numba twins (fedpers.nn.jit.pooling2d)
loop over windows and need none.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..order import Life
from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import for_backend
from .window import offset_block, output_size, resolve_padding

KERNELS = (
    "max_pool_forward", "max_pool_backward", "avg_pool_forward", "avg_pool_backward", "global_max_forward",
    "global_max_backward", "global_avg_forward", "global_avg_backward",
)  # fmt: skip
NO_WINDOW = 255  # the code of a window that is all padding
MAX_WINDOW = 255  # window offsets must fit a uint8 code below NO_WINDOW


@lru_cache(maxsize=256)
def _blocks(kh: int, kw: int, sh: int, sw: int, pt: int, pl: int, h: int, w: int, oh: int, ow: int):
    """Per window offset, row-major: (k, (i0, i1), (j0, j1), input rows, input columns) of the
    outputs whose window has a real element there; offsets that touch no input are left out."""
    out = []
    for ki in range(kh):
        rows = offset_block(ki, sh, pt, h, oh)
        for kj in range(kw):
            cols = offset_block(kj, sw, pl, w, ow)
            if rows and cols:
                out.append((ki * kw + kj, rows[:2], cols[:2], rows[2], cols[2]))
    return tuple(out)


@lru_cache(maxsize=256)
def _counts(kh: int, kw: int, sh: int, sw: int, pt: int, pl: int, h: int, w: int, oh: int, ow: int,
            dtype: np.dtype) -> np.ndarray:
    """(OH, OW) real elements per window, at least 1 (a window of padding only averages to 0)."""
    rows = [max(min(i * sh - pt + kh, h) - max(i * sh - pt, 0), 0) for i in range(oh)]
    cols = [max(min(j * sw - pl + kw, w) - max(j * sw - pl, 0), 0) for j in range(ow)]
    cnt = np.maximum(np.outer(rows, cols), 1).astype(dtype)  # alloc-ok: one (OH, OW) table per geometry
    cnt.setflags(write=False)
    return cnt


@lru_cache(maxsize=256)
def _covers(kh: int, kw: int, sh: int, sw: int, pt: int, pl: int, h: int, w: int, oh: int, ow: int) -> bool:
    """Whether every output window has a real element (else those windows are all padding)."""
    seen = np.zeros((oh, ow), bool)  # alloc-ok: (OH, OW) booleans, once per geometry
    for _, (i0, i1), (j0, j1), _, _ in _blocks(kh, kw, sh, sw, pt, pl, h, w, oh, ow):
        seen[i0:i1, j0:j1] = True
    return bool(seen.all())


def pairs_2x2(kh: int, kw: int, sh: int, sw: int, pt: int, pl: int) -> bool:
    """The common 2x2 / stride 2 / no padding pooling, which the numpy forward does as a tournament."""
    return (kh, kw, sh, sw, pt, pl) == (2, 2, 2, 2, 0, 0)


def _max_pool_2x2(x, out, code, flags, tmp) -> None:
    """The 2x2 tournament: a = the second of the top pair wins, b = the same for the bottom pair,
    c = the bottom pair wins; code = c ? 2 + b : a, as bytes (ties: the first in row-major order)."""
    oh, ow = out.shape[1:]
    q = [x[:, i : 2 * oh : 2, j : 2 * ow : 2] for i in (0, 1) for j in (0, 1)]
    a, b, c = flags[0], flags[1], flags[2]
    np.maximum(q[0], q[1], out=out)
    np.greater(q[1], q[0], out=a)
    np.maximum(q[2], q[3], out=tmp)
    np.greater(q[3], q[2], out=b)
    np.greater(tmp, out, out=c)
    np.maximum(out, tmp, out=out)
    a8, b8, c8 = a.view(np.uint8), b.view(np.uint8), c.view(np.uint8)
    np.subtract(b8, a8, out=b8)  # modulo 256: code = a + c * (2 + b - a) lands in 0..3
    np.add(b8, 2, out=b8)
    np.multiply(b8, c8, out=b8)
    np.add(b8, a8, out=code)


def max_pool_forward(x, out, code, kh, kw, sh, sw, pt, pl, *, flags, tmp=None) -> None:
    """x (planes, H, W) -> out (planes, OH, OW) and code = the max's offset in its window, ki*kw + kj
    (NO_WINDOW: all padding, out 0). Padding never wins; the first of equal maxima in row-major
    order wins. flags: bool scratch, (3, planes, OH, OW) for 2x2 pairs (with tmp, a float scratch
    of out's shape), else (1, planes, OH, OW)."""
    planes, h, w = x.shape
    oh, ow = out.shape[1:]
    if pairs_2x2(kh, kw, sh, sw, pt, pl) and tmp is not None:
        _max_pool_2x2(x, out, code, flags, tmp)
        return
    flags = flags[0]
    blocks = _blocks(kh, kw, sh, sw, pt, pl, h, w, oh, ow)
    first = blocks[0] if blocks else None
    if first and first[1] == (0, oh) and first[2] == (0, ow):  # the first offset starts every window
        np.copyto(out, x[:, first[3], first[4]])
        code.fill(first[0])
        blocks = blocks[1:]
    else:
        out.fill(-np.inf)
        code.fill(NO_WINDOW)
    for k, (i0, i1), (j0, j1), rs, cs in blocks:
        v, o = x[:, rs, cs], out[:, i0:i1, j0:j1]
        f = flags[:, i0:i1, j0:j1]
        np.greater(v, o, out=f)
        np.copyto(o, v, where=f)
        np.copyto(code[:, i0:i1, j0:j1], k, where=f)
    if not _covers(kh, kw, sh, sw, pt, pl, h, w, oh, ow):
        np.equal(code, NO_WINDOW, out=flags)
        np.copyto(out, 0.0, where=flags)


def max_pool_backward(dy, code, dx, kh, kw, sh, sw, pt, pl, *, flags, tmp=None) -> None:
    """dx (planes, H, W) = dy scattered to the recorded maxima (overlapping windows add; then tmp, a
    float scratch of dy's shape, holds each offset's share). flags: bool scratch of dy's shape."""
    planes, h, w = dx.shape
    oh, ow = dy.shape[1:]
    overlap = sh < kh or sw < kw
    if overlap or oh * sh != h or ow * sw != w or pt or pl or kh != sh or kw != sw:
        dx.fill(0.0)  # some inputs are in no window or in several
    for k, (i0, i1), (j0, j1), rs, cs in _blocks(kh, kw, sh, sw, pt, pl, h, w, oh, ow):
        f = flags[:, i0:i1, j0:j1]
        np.equal(code[:, i0:i1, j0:j1], k, out=f)
        d = dx[:, rs, cs]
        if overlap:
            t = tmp[:, i0:i1, j0:j1]
            np.multiply(dy[:, i0:i1, j0:j1], f, out=t)
            np.add(d, t, out=d)
        else:
            np.multiply(dy[:, i0:i1, j0:j1], f, out=d)


def avg_pool_forward(x, out, kh, kw, sh, sw, pt, pl) -> None:
    """Mean over the real elements of each window (padding is not counted)."""
    planes, h, w = x.shape
    oh, ow = out.shape[1:]
    out.fill(0.0)
    for _, (i0, i1), (j0, j1), rs, cs in _blocks(kh, kw, sh, sw, pt, pl, h, w, oh, ow):
        o = out[:, i0:i1, j0:j1]
        np.add(o, x[:, rs, cs], out=o)
    np.divide(out, _counts(kh, kw, sh, sw, pt, pl, h, w, oh, ow, out.dtype), out=out)


def avg_pool_backward(dy, dx, kh, kw, sh, sw, pt, pl, *, tmp) -> None:
    """dx = each window's dy / (its real element count), added over overlapping windows; tmp: float
    scratch of dy's shape."""
    planes, h, w = dx.shape
    oh, ow = dy.shape[1:]
    np.divide(dy, _counts(kh, kw, sh, sw, pt, pl, h, w, oh, ow, dy.dtype), out=tmp)
    dx.fill(0.0)
    for _, (i0, i1), (j0, j1), rs, cs in _blocks(kh, kw, sh, sw, pt, pl, h, w, oh, ow):
        d = dx[:, rs, cs]
        np.add(d, tmp[:, i0:i1, j0:j1], out=d)


def global_max_forward(x, out, idx) -> None:
    """x (planes, H*W) -> out (planes,) = max of each plane, idx (int64) = its position (first of ties)."""
    np.max(x, axis=1, out=out)
    np.argmax(x, axis=1, out=idx)


def global_max_backward(dy, idx, dx) -> None:
    dx.fill(0.0)
    np.put_along_axis(dx, idx[:, None], dy[:, None], axis=1)


def global_avg_forward(x, out) -> None:
    np.mean(x, axis=1, out=out)


def global_avg_backward(dy, dx) -> None:
    np.divide(dy[:, None], dx.shape[1], out=dx)


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
        self.k = for_backend(__name__, ctx.kernels)
        numpy = ctx.kernels == "numpy"
        self.mode = spec.pooling
        self.idx = self.flags_fwd = self.flags_bwd = self.tmp = self.pair_max = None
        if self.mode.startswith("global"):
            if self.mode == "global_max":
                self.idx = ctx.request_tensor("argmax", (n * c,), Life.FORWARD | Life.CALC_DERIV, np.int64)
            return (n, c, 1, 1)
        if spec.pool_size is None:
            raise ctx.error("pool_size", f"{self.mode} pooling needs pool_size")
        self.size = tuple(spec.pool_size)
        self.stride = tuple(spec.stride or self.size)
        self.pads = resolve_padding(spec.padding, (h, w), self.size, self.stride)
        if self.pads[0] >= self.size[0] or self.pads[2] >= self.size[1]:
            raise ctx.error("padding", f"padding {self.pads} must be smaller than pool_size {self.size}")
        if self.size[0] * self.size[1] > MAX_WINDOW:
            raise ctx.error("pool_size", f"a pooling window has at most {MAX_WINDOW} elements, got {self.size}")
        oh = output_size(h, self.size[0], self.stride[0], self.pads[0], self.pads[1])
        ow = output_size(w, self.size[1], self.stride[1], self.pads[2], self.pads[3])
        if oh <= 0 or ow <= 0:
            raise ctx.error("pool_size", f"pool {self.size} does not fit the padded {h}x{w} input")
        planes = (n * c, oh, ow)
        overlap = self.stride[0] < self.size[0] or self.stride[1] < self.size[1]
        if self.mode == "max":
            self.idx = ctx.request_tensor("argmax", planes, Life.FORWARD | Life.CALC_DERIV, np.uint8)
            if numpy:
                pairs = pairs_2x2(*self.size, *self.stride, self.pads[0], self.pads[2])
                self.flags_fwd = ctx.request_tensor("flags", (3 if pairs else 1, *planes), Life.FORWARD, np.bool_)
                if pairs:
                    self.pair_max = ctx.request_tensor("pair_max", planes, Life.FORWARD)
                self.flags_bwd = ctx.request_tensor("flags_deriv", planes, Life.CALC_DERIV, np.bool_)
                if overlap:
                    self.tmp = ctx.request_tensor("share", planes, Life.CALC_DERIV)
        elif numpy:
            self.tmp = ctx.request_tensor("share", planes, Life.CALC_DERIV)
        return (n, c, oh, ow)

    def _window(self) -> tuple[int, int, int, int, int, int]:
        return (*self.size, *self.stride, self.pads[0], self.pads[2])

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        n, c, h, w = x.shape
        k = self.k
        if self.mode == "global_max":
            k.global_max_forward(x.reshape(n * c, h * w), out.reshape(n * c), run.tensor(self.idx))
        elif self.mode == "global_average":
            k.global_avg_forward(x.reshape(n * c, h * w), out.reshape(n * c))
        elif self.mode == "max":
            o3 = out.reshape(n * c, *out.shape[2:])
            extra = {} if self.flags_fwd is None else {"flags": run.tensor(self.flags_fwd)}
            if self.pair_max is not None:
                extra["tmp"] = run.tensor(self.pair_max)
            k.max_pool_forward(x.reshape(n * c, h, w), o3, run.tensor(self.idx), *self._window(), **extra)
        else:
            k.avg_pool_forward(x.reshape(n * c, h, w), out.reshape(n * c, *out.shape[2:]), *self._window())

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is None:
            return
        dy = run.dout()
        n, c, h, w = din.shape
        k = self.k
        if self.mode == "global_max":
            k.global_max_backward(dy.reshape(n * c), run.tensor(self.idx), din.reshape(n * c, h * w))
        elif self.mode == "global_average":
            k.global_avg_backward(dy.reshape(n * c), din.reshape(n * c, h * w))
        elif self.mode == "max":
            extra = {}
            if self.flags_bwd is not None:
                extra["flags"] = run.tensor(self.flags_bwd)
                if self.tmp is not None:
                    extra["tmp"] = run.tensor(self.tmp)
            k.max_pool_backward(dy.reshape(n * c, *dy.shape[2:]), run.tensor(self.idx), din.reshape(n * c, h, w),
                                *self._window(), **extra)
        else:
            extra = {} if self.tmp is None else {"tmp": run.tensor(self.tmp)}
            k.avg_pool_backward(dy.reshape(n * c, *dy.shape[2:]), din.reshape(n * c, h, w), *self._window(), **extra)
