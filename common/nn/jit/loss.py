"""numba twins of the loss kernels (fedpers.nn.layers.loss documents them)."""

from __future__ import annotations

import numpy as np

from . import kernel

KERNELS = ("cross_entropy_forward", "cross_entropy_backward")


@kernel("Tuple((float64, int64))({t}[:,::1], int64[::1], {t}[:,::1])")
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


@kernel("void({t}[:,::1], int64[::1], {t}, {t}[:,::1])")
def cross_entropy_backward(probs, labels, scale, dlogits):
    rows, n = probs.shape
    for r in range(rows):
        for j in range(n):
            dlogits[r, j] = probs[r, j] * scale
        dlogits[r, labels[r]] -= scale
