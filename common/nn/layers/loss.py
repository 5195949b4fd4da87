"""Loss layers the graph appends after the last layer (not INI types).

Both are means over the batch, as in PyTorch and TensorFlow. The trainer puts the labels in
run.feed.y and the gradient scale 1/(examples in the whole batch) in run.feed.scale (micro-batches
of one batch share it). forward leaves the summed loss and the number of correct predictions of
this (micro-)batch in run.feed.loss_sum / run.feed.correct.
"""

from __future__ import annotations

import numpy as np

from ..order import Life
from . import activation
from .base import InitContext, Layer, RunContext, Shape
from .kernels import for_backend

KERNELS = ("cross_entropy_forward", "cross_entropy_backward")


def cross_entropy_forward(logits, labels, probs, *, rows) -> tuple[float, int]:
    """Stable softmax into probs (may be the logits' own buffer); returns (sum of -log p[label],
    correct count). rows: (rows,) scratch. Labels are in [0, n)."""
    r = np.arange(len(labels))  # alloc-ok: one index per example
    correct = int(np.count_nonzero(logits.argmax(axis=1) == labels))
    np.max(logits, axis=1, out=rows)
    np.subtract(logits, rows[:, None], out=probs)
    picked = probs[r, labels].astype(np.float64)  # alloc-ok: (rows,) the labels' shifted logits, before exp
    np.exp(probs, out=probs)
    np.sum(probs, axis=1, out=rows)
    total = float(np.log(rows.astype(np.float64)).sum() - picked.sum())  # alloc-ok: (rows,)
    np.divide(probs, rows[:, None], out=probs)
    return total, correct


def cross_entropy_backward(probs, labels, scale, dlogits) -> None:
    np.multiply(probs, scale, out=dlogits)
    dlogits[np.arange(len(labels)), labels] -= scale  # alloc-ok: one index per example


class CrossEntropyLoss(Layer):
    """Softmax fused with cross-entropy over integer class labels; output = probabilities."""

    kind = "loss_cross"

    def finalize(self, ctx: InitContext) -> Shape:
        (shape,) = ctx.input_shapes
        if len(shape) != 2:
            raise ctx.error("loss", f"cross entropy needs a (batch, classes) input, got {shape[1:]}")
        ctx.inplace = True  # probabilities overwrite the logits
        ctx.output_life = Life.CALC_DERIV
        self.k = for_backend(__name__, ctx.kernels)
        self.softmax = for_backend(activation.__name__, ctx.kernels)
        self.rows = None
        if ctx.kernels == "numpy":
            self.rows = ctx.request_tensor("row_stats", (shape[0],), Life.FORWARD)
        return shape

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        feed = run.feed
        extra = {} if self.rows is None else {"rows": run.tensor(self.rows)}
        if feed.y is None:
            self.softmax.softmax_forward(x, out, **extra)
            return
        feed.loss_sum, feed.correct = self.k.cross_entropy_forward(x, feed.y, out, **extra)

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is not None:
            self.k.cross_entropy_backward(run.output(), run.feed.y, run.output().dtype.type(run.feed.scale), din)


class MSELoss(Layer):
    """Mean squared error over all elements; y is a float target of the output's shape."""

    kind = "loss_mse"

    def finalize(self, ctx: InitContext) -> Shape:
        (shape,) = ctx.input_shapes
        ctx.view = True
        ctx.output_life = Life.CALC_DERIV
        self.diff = ctx.request_tensor("diff", (shape[0], int(np.prod(shape[1:]))), Life.FORWARD)
        return shape

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        if not run.aliased:
            np.copyto(out, x)
        feed = run.feed
        y = feed.y
        if y is None:
            return
        pred = x.reshape(x.shape[0], -1)
        diff = run.tensor(self.diff)
        np.subtract(pred, y.reshape(pred.shape), out=diff)
        per_example = x[0].size
        feed.loss_sum = float(np.einsum("ij,ij->", diff, diff)) / per_example
        if per_example > 1 and y.ndim == 2:
            feed.correct = int(np.count_nonzero(pred.argmax(1) == y.argmax(1)))
        else:
            feed.correct = 0

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is None:
            return
        pred = run.output().reshape(din.shape[0], -1)
        y = run.feed.y.reshape(pred.shape)
        per_example = pred.shape[1]
        d = din.reshape(pred.shape)
        np.subtract(pred, y, out=d)
        d *= np.float32(2.0 * run.feed.scale / per_example)
