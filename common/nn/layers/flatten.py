"""Flatten: (B, C, H, W) -> (B, C*H*W) as a view of the input (a copy only in naive mode)."""

from __future__ import annotations

import math

import numpy as np

from .base import InitContext, Layer, RunContext, Shape, register


@register
class Flatten(Layer):
    kind = "flatten"

    def finalize(self, ctx: InitContext) -> Shape:
        (shape,) = ctx.input_shapes
        ctx.view = True
        return (ctx.batch, math.prod(shape[1:]))

    def forward(self, run: RunContext, training: bool) -> None:
        if not run.aliased:
            out = run.output()
            np.copyto(out, run.input().reshape(out.shape))

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is not None and not run.aliased:
            np.copyto(din, run.dout().reshape(din.shape))
