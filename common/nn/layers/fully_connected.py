"""Fully connected layer: y = x W + b over the flattened non-batch dims; W is (in, out)."""

from __future__ import annotations

import math

import numpy as np

from ..order import Life
from . import kernels
from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import for_backend

BLOCK_BYTES = 1 << 20  # micro-batching: dW is added to its accumulator through blocks of at most 1 MiB


@register
class FullyConnected(Layer):
    kind = "fully_connected"
    has_weights = True

    def finalize(self, ctx: InitContext) -> Shape:
        if self.spec.unit is None:
            raise ctx.error("unit", "a fully_connected layer needs Unit")
        (shape,) = ctx.input_shapes
        self.k = for_backend(kernels.__name__, ctx.kernels)  # the bias add
        fan_in, units = math.prod(shape[1:]), self.spec.unit
        self.w = ctx.request_weight(
            "weight", (fan_in, units), self.spec.weight_initializer or "xavier_uniform", fan_in=fan_in, fan_out=units
        )
        self.b = ctx.request_weight("bias", (units,), self.spec.bias_initializer or "zeros")
        ctx.input_life = Life.CALC_GRAD  # dW = x^T dy
        self.block = None
        if ctx.accumulates:  # dW added to the accumulator a block of rows at a time
            rows = max(1, min(fan_in, BLOCK_BYTES // (4 * units)))
            self.block = ctx.request_tensor("wgrad_block", (rows, units), Life.CALC_GRAD)
        return (ctx.batch, units)

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        np.matmul(x.reshape(x.shape[0], -1), run.weight(self.w), out=out)
        self.k.add_bias(out.reshape(out.shape[0], -1, 1), run.weight(self.b))

    def calc_gradient(self, run: RunContext) -> None:
        x, dy = run.input(), run.dout()
        x2 = x.reshape(x.shape[0], -1)
        gw, gb = run.grad(self.w), run.grad(self.b)
        if not run.accumulate:
            np.matmul(x2.T, dy, out=gw)
            np.sum(dy, axis=0, out=gb)
            return
        block = run.tensor(self.block)
        rows = block.shape[0]
        for r0 in range(0, gw.shape[0], rows):
            r1 = min(r0 + rows, gw.shape[0])
            part = block[: r1 - r0]
            np.matmul(x2[:, r0:r1].T, dy, out=part)
            np.add(gw[r0:r1], part, out=gw[r0:r1])
        np.sum(dy, axis=0, out=block[0])
        np.add(gb, block[0], out=gb)

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is not None:
            np.matmul(run.dout(), run.weight(self.w).T, out=din.reshape(din.shape[0], -1))
