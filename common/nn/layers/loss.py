"""Loss layers the graph appends after the last layer (not INI types).

Both are means over the batch, as in PyTorch and TensorFlow. The trainer puts the labels in
run.feed.y and the gradient scale 1/(examples in the whole batch) in run.feed.scale (micro-batches
of one batch share it). forward leaves the summed loss and the number of correct predictions of
this (micro-)batch in run.feed.loss_sum / run.feed.correct.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..order import Life
from .activation import softmax_forward
from .base import InitContext, Layer, RunContext, Shape


@njit(cache=True, nogil=True)
def cross_entropy_forward(logits, labels, probs):
    """Stable softmax into probs (may be the logits' own buffer); returns (sum of -log p[label],
    correct count). Each row is fully read before it is overwritten. Labels are in [0, n)."""
    rows, n = logits.shape
    total = 0.0
    correct = 0
    for r in range(rows):
        m = logits[r, 0]
        best = 0
        for j in range(1, n):
            if logits[r, j] > m:
                m = logits[r, j]
                best = j
        s = 0.0
        for j in range(n):
            s += np.exp(logits[r, j] - m)
        lab = labels[r]
        total += np.log(s) - (logits[r, lab] - m)
        if best == lab:
            correct += 1
        inv = 1.0 / s
        for j in range(n):
            probs[r, j] = np.exp(logits[r, j] - m) * inv
    return total, correct


@njit(cache=True, nogil=True)
def cross_entropy_backward(probs, labels, scale, dlogits):
    rows, n = probs.shape
    for r in range(rows):
        for j in range(n):
            dlogits[r, j] = probs[r, j] * scale
        dlogits[r, labels[r]] -= scale


class CrossEntropyLoss(Layer):
    """Softmax fused with cross-entropy over integer class labels; output = probabilities."""

    kind = "loss_cross"

    def finalize(self, ctx: InitContext) -> Shape:
        (shape,) = ctx.input_shapes
        if len(shape) != 2:
            raise ctx.error("loss", f"cross entropy needs a (batch, classes) input, got {shape[1:]}")
        ctx.inplace = True  # probabilities overwrite the logits
        ctx.output_life = Life.CALC_DERIV
        return shape

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        feed = run.feed
        if feed.y is None:
            softmax_forward(x, out)
            return
        feed.loss_sum, feed.correct = cross_entropy_forward(x, feed.y, out)

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is not None:
            cross_entropy_backward(run.output(), run.feed.y, np.float32(run.feed.scale), din)


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
