"""Addition: the sum of several inputs of one shape (residual joins); each input's derivative is dout."""

from __future__ import annotations

import numpy as np

from .base import InitContext, Layer, RunContext, Shape, register


@register
class Addition(Layer):
    kind = "addition"

    def finalize(self, ctx: InitContext) -> Shape:
        shapes = ctx.input_shapes
        if len(shapes) < 2:
            raise ctx.error("input_layers", "addition needs at least two input layers")
        if any(s != shapes[0] for s in shapes[1:]):
            raise ctx.error("input_layers", f"addition inputs differ in shape: {[s[1:] for s in shapes]}")
        return shapes[0]

    def forward(self, run: RunContext, training: bool) -> None:
        out = run.output()
        np.add(run.input(0), run.input(1), out=out)
        for i in range(2, len(run.inputs)):
            out += run.input(i)

    def calc_derivative(self, run: RunContext) -> None:
        dy = run.dout()
        for i in range(len(run.dins)):
            din = run.din(i)
            if din is not None:
                np.copyto(din, dy)
