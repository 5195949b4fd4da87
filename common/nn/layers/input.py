"""Input layer: the batch enters the arena here (the trainer puts it in run.feed.x / run.feed.idx)."""

from __future__ import annotations

import numpy as np

from .base import InitContext, Layer, RunContext, Shape, register


@register
class Input(Layer):
    kind = "input"

    def finalize(self, ctx: InitContext) -> Shape:
        if self.spec.input_shape is None:
            raise ctx.error("input_shape", "an input layer needs Input_Shape = C:H:W")
        return (ctx.batch, *self.spec.input_shape)

    def forward(self, run: RunContext, training: bool) -> None:
        """Gather the batch rows run.feed.idx of run.feed.x (or all of it)."""
        x, idx, out = run.feed.x, run.feed.idx, run.output()
        if idx is None:
            np.copyto(out, x.reshape(out.shape))
        else:
            np.take(x, idx, axis=0, out=out)

    def calc_derivative(self, run: RunContext) -> None:
        """Nothing upstream of the data."""
