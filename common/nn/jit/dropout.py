"""numba twins of the dropout kernels (fedpers.nn.layers.dropout documents them)."""

from __future__ import annotations

from numba import uint64

from ...rng import GOLDEN
from . import kernel
from .rng import counter_hash

KERNELS = ("dropout_forward", "dropout_backward")
BITS = 24  # uniform draws of 24 bits: the rate is resolved to 1 / 16M


@kernel("void({t}[::1], {t}[::1], uint8[::1], float64, uint64)")
def dropout_forward(x, out, mask, rate, seed):
    """mask[i] = 1 with probability 1 - rate (from hash(seed, i)); out = x * mask / (1 - rate); out may alias x."""
    threshold = uint64(int(rate * (1 << BITS)))
    scale = 1.0 / (1.0 - rate)
    key = seed * uint64(GOLDEN)
    for i in range(x.size):
        keep = (counter_hash(key, i) >> uint64(64 - BITS)) >= threshold
        mask[i] = 1 if keep else 0
        out[i] = x[i] * scale if keep else 0.0


@kernel("void({t}[::1], uint8[::1], float64, {t}[::1])")
def dropout_backward(dy, mask, rate, dx):
    """dx = dy * mask / (1 - rate); dx may alias dy."""
    scale = 1.0 / (1.0 - rate)
    for i in range(dy.size):
        dx[i] = dy[i] * scale if mask[i] else 0.0
