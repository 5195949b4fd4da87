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

import numpy as np

from ..order import Life
from .base import InitContext, Layer, RunContext, Shape, register
from .kernels import for_backend

KERNELS = ("min_max_normalize", "standardize_rows")


def min_max_normalize(x) -> None:
    """x (rows, F) in place: (x - min) / (max - min) over all of x; zeros when max == min."""
    lo, hi = x.min(), x.max()  # alloc-ok: two scalars
    np.subtract(x, lo, out=x)
    if hi > lo:
        np.divide(x, hi - lo, out=x)
    else:
        x.fill(0)


def standardize_rows(x, *, rows) -> None:
    """Each row of x (rows, F) in place: (x - mean) / (||x - mean||_2 / F), as NNTrainer's
    standardization; a constant row becomes zeros. `rows` is a (rows,) scratch."""
    f = x.shape[1]
    np.sum(x, axis=1, out=rows)
    np.divide(rows, f, out=rows)
    np.subtract(x, rows[:, None], out=x)
    np.einsum("ij,ij->i", x, x, out=rows)
    np.sqrt(rows, out=rows)
    np.divide(rows, f, out=rows)
    # A constant row is all zeros by now: any finite factor keeps it zero.
    np.maximum(rows, np.finfo(rows.dtype).tiny, out=rows)
    np.reciprocal(rows, out=rows)
    np.multiply(x, rows[:, None], out=x)


@register
class Input(Layer):
    kind = "input"

    def finalize(self, ctx: InitContext) -> Shape:
        if self.spec.input_shape is None:
            raise ctx.error("input_shape", "an input layer needs Input_Shape = C:H:W")
        self.k = for_backend(__name__, ctx.kernels)
        self.rows = None
        if self.spec.standardization and ctx.kernels == "numpy":
            self.rows = ctx.request_tensor("row_stats", (ctx.batch,), Life.FORWARD)
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
                self.k.min_max_normalize(rows)
            if self.spec.standardization:
                extra = {} if self.rows is None else {"rows": run.tensor(self.rows)}
                self.k.standardize_rows(rows, **extra)

    def calc_derivative(self, run: RunContext) -> None:
        """Nothing upstream of the data."""
