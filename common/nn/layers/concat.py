"""Concat: inputs joined along one axis of their NCHW shape, as NNTrainer's concat layer does.

Shapes are read the NNTrainer way: a (N, F) tensor is (N, 1, 1, F). `axis` is 1 (channel), 2
(height) or 3 (width); unset, it is 3 when the first input has more than one channel, else 1
(NNTrainer's default). Every other axis must agree. Seen as (N * lead, tail) with lead the product
of the axes before `axis` and tail the product from `axis` on, each input is one block of columns
of the output, so forward and derivative are strided block copies between views (no scratch).
"""

from __future__ import annotations

import math

import numpy as np

from .base import InitContext, Layer, RunContext, Shape, register


def nchw(shape: Shape) -> tuple[int, int, int]:
    """The (C, H, W) NNTrainer sees for a fedpers per-example shape: (F,) -> (1, 1, F)."""
    if len(shape) == 1:
        return (1, 1, shape[0])
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2])
    raise ValueError(f"no NCHW reading for per-example shape {shape}")


@register
class Concat(Layer):
    kind = "concat"

    def finalize(self, ctx: InitContext) -> Shape:
        shapes = ctx.input_shapes
        if not shapes:
            raise ctx.error("input_layers", "concat needs at least one input layer")
        try:
            dims = [nchw(s[1:]) for s in shapes]
        except ValueError as e:
            raise ctx.error("input_layers", str(e)) from None
        axis = self.spec.axis if self.spec.axis is not None else (3 if dims[0][0] > 1 else 1)
        k = axis - 1  # index into (C, H, W)
        for d in dims[1:]:
            if any(d[i] != dims[0][i] for i in range(3) if i != k):
                raise ctx.error("input_layers", f"concat along axis {axis} needs the other axes equal, got "
                                                f"{[s[1:] for s in shapes]} (as C:H:W {dims})")
        out = list(dims[0])
        out[k] = sum(d[k] for d in dims)
        self.lead = math.prod(out[:k])  # axes between batch and the joined one
        self.tails = [math.prod(d[k:]) for d in dims]
        self.tail = math.prod(out[k:])
        if axis == 3 and all(len(s) == 2 for s in shapes):
            return (ctx.batch, out[2])  # (N, F) inputs joined along features stay (N, F)
        return (ctx.batch, *out)

    def _blocks(self, whole: np.ndarray) -> list[np.ndarray]:
        """Views of `whole` (the output or its derivative) as (N * lead, tail_i) column blocks."""
        flat = whole.reshape(-1, self.tail)
        out, start = [], 0
        for t in self.tails:
            out.append(flat[:, start : start + t])
            start += t
        return out

    def forward(self, run: RunContext, training: bool) -> None:
        for i, block in enumerate(self._blocks(run.output())):
            x = run.input(i)
            np.copyto(block, x.reshape(block.shape))

    def calc_derivative(self, run: RunContext) -> None:
        for i, block in enumerate(self._blocks(run.dout())):
            din = run.din(i)
            if din is not None:
                np.copyto(din.reshape(block.shape), block)
