"""Activation layer (relu, sigmoid, tanh, softmax, none): in place, derivative in place.

relu saves one sign bit per element for its backward (dx = dy where x > 0), not its output, so
the output's buffer is free once the next layer has read it: 1/32 of the bytes, and a conv + relu
feeding a pooling layer leaves nothing float-sized alive until backward. When some reader of the
output keeps it for its own backward anyway (a conv or dense layer needs its input for dW), the
graph says so (`ctx.output_kept`) and relu reads the signs from the output instead of saving bits.
sigmoid, tanh and softmax compute their derivative from the output, so they keep it.
softmax normalizes over all of an example's values (C*H*W together for image-shaped input).

numpy kernels pack and unpack the sign bits eight at a time with 64-bit multiplies (a byte per
element in a transient boolean scratch at forward and at calc-derivative); the numba twins in
fedpers.nn.jit.activation need no scratch.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from ..order import Life
from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import for_backend

KERNELS = (
    "relu_forward", "relu_backward", "relu_mask_forward", "relu_mask_backward", "sigmoid_forward",
    "sigmoid_backward", "tanh_forward", "tanh_backward", "softmax_forward", "softmax_backward",
)  # fmt: skip
# Eight 0/1 bytes (little-endian u64) -> one byte, bit k = byte k: each byte moves to bit 56 + k.
_PACK = np.uint64(0x0102040810204080)
# One byte p -> eight bytes, byte k = bit k of p: spread, select bit k in byte k, test non-zero.
_SPREAD, _SELECT = np.uint64(0x0101010101010101), np.uint64(0x8040201008040201)
_LOW7, _HIGH = np.uint64(0x7F7F7F7F7F7F7F7F), np.uint64(0x8080808080808080)
PACKED_SIGNS = sys.byteorder == "little"  # the u64 tricks read bytes in little-endian order


def sign_bytes(n: int) -> int:
    """Bytes of the boolean scratch the numpy sign kernels use for n elements (whole 64-bit words)."""
    return -(-n // 8) * 8


def relu_forward(x, out) -> None:
    np.maximum(x, 0, out=out)


def relu_backward(y, dy, dx, *, flags) -> None:
    """dx = dy where y > 0; dx may alias dy. flags: bool scratch of y's size."""
    f = flags[: y.size]
    np.greater(y, 0, out=f)
    np.multiply(dy, f, out=dx)


def relu_mask_forward(x, out, bits, *, flags) -> None:
    """out = max(x, 0) (out may alias x) and bit i & 7 of bits[i >> 3] = x[i] > 0.
    flags: bool scratch of sign_bytes(x.size)."""
    n = x.size
    np.greater(x, 0, out=flags[:n])
    flags[n:] = False
    words = flags.view(np.uint64)
    np.multiply(words, _PACK, out=words)
    np.right_shift(words, np.uint64(56), out=words)
    np.copyto(bits, words, casting="unsafe")  # the low byte of each word
    np.maximum(x, 0, out=out)


def relu_mask_backward(bits, dy, dx, *, flags) -> None:
    """dx = dy where the sign bit is set, else 0; dx may alias dy. flags: bool scratch of
    sign_bytes(dy.size)."""
    words = flags.view(np.uint64)
    np.copyto(words, bits)
    np.multiply(words, _SPREAD, out=words)
    np.bitwise_and(words, _SELECT, out=words)
    np.add(words, _LOW7, out=words)
    np.bitwise_and(words, _HIGH, out=words)
    np.right_shift(words, np.uint64(7), out=words)
    np.multiply(dy, flags[: dy.size], out=dx)


def sigmoid_forward(x, out) -> None:
    """1 / (1 + e^-x) as (1 + tanh(x / 2)) / 2: no overflow for any x."""
    np.multiply(x, 0.5, out=out)
    np.tanh(out, out=out)
    np.add(out, 1.0, out=out)
    np.multiply(out, 0.5, out=out)


def sigmoid_backward(y, dy, dx, *, tmp) -> None:
    """dx = dy * y * (1 - y); tmp: float scratch of y's size."""
    np.subtract(1.0, y, out=tmp)
    np.multiply(tmp, y, out=tmp)
    np.multiply(dy, tmp, out=dx)


def tanh_forward(x, out) -> None:
    np.tanh(x, out=out)


def tanh_backward(y, dy, dx, *, tmp) -> None:
    """dx = dy * (1 - y^2); tmp: float scratch of y's size."""
    np.multiply(y, y, out=tmp)
    np.subtract(1.0, tmp, out=tmp)
    np.multiply(dy, tmp, out=dx)


def softmax_forward(x, out, *, rows) -> None:
    """Row-wise softmax of a (rows, n) matrix; stable (max subtracted). rows: (rows,) scratch."""
    np.max(x, axis=1, out=rows)
    np.subtract(x, rows[:, None], out=out)
    np.exp(out, out=out)
    np.sum(out, axis=1, out=rows)
    np.divide(out, rows[:, None], out=out)


def softmax_backward(y, dy, dx, *, rows) -> None:
    """dx = y * (dy - sum(dy * y)) per row; dx may alias dy. rows: (rows,) scratch."""
    np.einsum("ij,ij->i", dy, y, out=rows)
    np.subtract(dy, rows[:, None], out=dx)
    np.multiply(dx, y, out=dx)


ELEMENTWISE = {
    "relu": ("relu_forward", "relu_backward"),
    "sigmoid": ("sigmoid_forward", "sigmoid_backward"),
    "tanh": ("tanh_forward", "tanh_backward"),
}


@register
class Activation(Layer):
    kind = "activation"

    def finalize(self, ctx: InitContext) -> Shape:
        self.fn = self.spec.activation or "none"
        self.k = for_backend(__name__, ctx.kernels)
        numpy = ctx.kernels == "numpy"
        self.masked = False
        self.bits = self.flags = self.flags_deriv = self.tmp = self.rows = self.rows_deriv = None
        (shape,) = ctx.input_shapes
        n = math.prod(shape)
        if self.fn == "none":
            ctx.view = True
            return shape
        ctx.inplace = True
        ctx.deriv_inplace = True
        if self.fn == "relu" and not ctx.output_kept and (PACKED_SIGNS or not numpy):
            self.masked = True  # backward reads sign bits; the output is not kept for it
            self.bits = ctx.request_tensor("signs", (-(-n // 8),), Life.FORWARD | Life.CALC_DERIV, np.uint8)
            if numpy:
                self.flags = ctx.request_tensor("sign_bytes", (sign_bytes(n),), Life.FORWARD, np.bool_)
                self.flags_deriv = ctx.request_tensor("sign_bytes_deriv", (sign_bytes(n),), Life.CALC_DERIV,
                                                      np.bool_)
            return shape
        ctx.output_life = Life.CALC_DERIV
        if numpy:
            if self.fn == "relu":
                self.flags_deriv = ctx.request_tensor("sign_bytes_deriv", (n,), Life.CALC_DERIV, np.bool_)
            elif self.fn in ("sigmoid", "tanh"):
                self.tmp = ctx.request_tensor("share", (n,), Life.CALC_DERIV)
            elif self.fn == "softmax":
                self.rows = ctx.request_tensor("row_stats", (shape[0],), Life.FORWARD)
                self.rows_deriv = ctx.request_tensor("row_stats_deriv", (shape[0],), Life.CALC_DERIV)
        return shape

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        k = self.k
        if self.fn == "none":
            if not run.aliased:
                np.copyto(out, x)
        elif self.fn == "softmax":
            extra = {} if self.rows is None else {"rows": run.tensor(self.rows)}
            k.softmax_forward(x.reshape(x.shape[0], -1), out.reshape(out.shape[0], -1), **extra)
        elif self.masked:
            extra = {} if self.flags is None else {"flags": run.tensor(self.flags)}
            k.relu_mask_forward(x.reshape(-1), out.reshape(-1), run.tensor(self.bits), **extra)
        else:
            getattr(k, ELEMENTWISE[self.fn][0])(x.reshape(-1), out.reshape(-1))

    def calc_derivative(self, run: RunContext) -> None:
        din, dy = run.din(), run.dout()
        if din is None:
            return
        k = self.k
        if self.fn == "none":
            if din is not dy:
                np.copyto(din, dy)
        elif self.fn == "softmax":
            y = run.output()
            extra = {} if self.rows_deriv is None else {"rows": run.tensor(self.rows_deriv)}
            k.softmax_backward(y.reshape(y.shape[0], -1), dy.reshape(dy.shape[0], -1),
                               din.reshape(din.shape[0], -1), **extra)
        elif self.masked:
            extra = {} if self.flags_deriv is None else {"flags": run.tensor(self.flags_deriv)}
            k.relu_mask_backward(run.tensor(self.bits), dy.reshape(-1), din.reshape(-1), **extra)
        else:
            extra = {}
            if self.flags_deriv is not None:
                extra["flags"] = run.tensor(self.flags_deriv)
            elif self.tmp is not None:
                extra["tmp"] = run.tensor(self.tmp)
            getattr(k, ELEMENTWISE[self.fn][1])(run.output().reshape(-1), dy.reshape(-1), din.reshape(-1), **extra)
