"""Input layer: the batch enters the arena here (the trainer puts it in run.feed.x / run.feed.idx).

With `normalization` / `standardization` it scales the batch in place the way NNTrainer's input
layer does, so a model file means the same here and there:
- normalization: (x - min) / (max - min) with min and max over the whole (micro-)batch tensor
  (all zeros when max == min);
- standardization, then, per example of F values: (x - mean) / (||x - mean||_2 / F). That divisor
  is std / sqrt(F), not the standard deviation, so the result has standard deviation sqrt(F);
  an example whose values are all equal becomes zeros (NNTrainer would divide by zero).
Nothing upstream of the data: the derivative is never needed.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import REDUCE, signatures


@njit(signatures("void({t}[:,::1])"), cache=True, nogil=True, fastmath=REDUCE)
def min_max_normalize(x):
    """x (rows, F) in place: (x - min) / (max - min) over all of x; zeros when max == min."""
    rows, f = x.shape
    lo = x[0, 0]
    hi = x[0, 0]
    for r in range(rows):
        for j in range(f):
            v = x[r, j]
            lo = min(lo, v)
            hi = max(hi, v)
    span = hi - lo
    for r in range(rows):
        for j in range(f):
            x[r, j] = (x[r, j] - lo) / span if span > 0 else 0.0


@njit(signatures("void({t}[:,::1])"), cache=True, nogil=True, fastmath=REDUCE)
def standardize_rows(x):
    """Each row in place: (x - mean) / (||x - mean||_2 / F), as NNTrainer's standardization; a
    constant row becomes zeros."""
    rows, f = x.shape
    for r in range(rows):
        s = 0.0
        for j in range(f):
            s += x[r, j]
        mean = s / f
        ss = 0.0
        for j in range(f):
            d = x[r, j] - mean
            x[r, j] = d
            ss += d * d
        scale = math.sqrt(ss) / f
        inv = 1.0 / scale if scale > 0 else 0.0
        for j in range(f):
            x[r, j] *= inv


@register
class Input(Layer):
    kind = "input"

    def finalize(self, ctx: InitContext) -> Shape:
        if self.spec.input_shape is None:
            raise ctx.error("input_shape", "an input layer needs Input_Shape = C:H:W")
        return (ctx.batch, *self.spec.input_shape)

    def forward(self, run: RunContext, training: bool) -> None:
        """Gather the batch rows run.feed.idx of run.feed.x (or all of it), then scale as asked."""
        x, idx, out = run.feed.x, run.feed.idx, run.output()
        if idx is None:
            np.copyto(out, x.reshape(out.shape))
        else:
            np.take(x, idx, axis=0, out=out)
        if self.spec.normalization or self.spec.standardization:
            rows = out.reshape(out.shape[0], -1)
            if self.spec.normalization:
                min_max_normalize(rows)
            if self.spec.standardization:
                standardize_rows(rows)

    def calc_derivative(self, run: RunContext) -> None:
        """Nothing upstream of the data."""
