"""numba twins of the input layer's scaling kernels (fedpers.nn.layers.input documents them)."""

from __future__ import annotations

import math

from . import REDUCE, kernel

KERNELS = ("min_max_normalize", "standardize_rows")


@kernel("void({t}[:,::1])", fastmath=REDUCE)
def min_max_normalize(x):
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


@kernel("void({t}[:,::1])", fastmath=REDUCE)
def standardize_rows(x):
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
