"""Inverted dropout: in training each element is kept with probability 1 - rate and scaled by
1 / (1 - rate); in evaluation the layer is the identity. Works in place (forward and derivative).

The keep mask is a uint8 scratch (forward -> calc-derivative). Its random bits come from a
counter-based hash (fedpers.rng: splitmix64 of seed and element index), with one seed per forward
drawn from run.state.rng (the node's numpy Generator, seeded by the graph): reproducible, no
allocation, and the same mask for the same seed whatever the thread. run.state.active remembers
whether the last forward applied a mask, for calc_derivative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, uint64

from ...rng import GOLDEN
from ..jit.rng import counter_hash
from ..order import Life
from .base import InitContext, Layer, LayerState, RunContext, Shape, register
from .kernels import signatures

BITS = 24  # uniform draws of 24 bits: the rate is resolved to 1 / 16M


@njit(signatures("void({t}[::1], {t}[::1], uint8[::1], float64, uint64)"), cache=True, nogil=True)
def dropout_forward(x, out, mask, rate, seed):
    """mask[i] = 1 with probability 1 - rate (from hash(seed, i)); out = x * mask / (1 - rate); out may alias x."""
    threshold = uint64(int(rate * (1 << BITS)))
    scale = 1.0 / (1.0 - rate)
    key = seed * uint64(GOLDEN)
    for i in range(x.size):
        keep = (counter_hash(key, i) >> uint64(64 - BITS)) >= threshold
        mask[i] = 1 if keep else 0
        out[i] = x[i] * scale if keep else 0.0


@njit(signatures("void({t}[::1], uint8[::1], float64, {t}[::1])"), cache=True, nogil=True)
def dropout_backward(dy, mask, rate, dx):
    """dx = dy * mask / (1 - rate); dx may alias dy."""
    scale = 1.0 / (1.0 - rate)
    for i in range(dy.size):
        dx[i] = dy[i] * scale if mask[i] else 0.0


@dataclass(slots=True)
class DropoutState(LayerState):
    active: bool = False  # the last forward applied a mask (training with rate > 0)


@register
class Dropout(Layer):
    kind = "dropout"
    State = DropoutState

    def finalize(self, ctx: InitContext) -> Shape:
        (shape,) = ctx.input_shapes
        self.rate = float(self.spec.dropout_rate or 0.0)
        self.mask = None
        if self.rate > 0.0:
            self.mask = ctx.request_tensor("mask", shape, Life.FORWARD | Life.CALC_DERIV, np.uint8)
        ctx.inplace = True
        ctx.deriv_inplace = True
        return shape

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        state: DropoutState = run.state
        active = state.active = training and self.mask is not None
        if active:
            seed = int(state.rng.integers(0, 2**63))
            dropout_forward(
                x.reshape(-1), out.reshape(-1), run.tensor(self.mask).reshape(-1), self.rate, np.uint64(seed)
            )
        elif not run.aliased:
            np.copyto(out, x)

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is None:
            return
        dy = run.dout()
        if run.state.active:
            dropout_backward(dy.reshape(-1), run.tensor(self.mask).reshape(-1), self.rate, din.reshape(-1))
        elif not np.shares_memory(din, dy):
            np.copyto(din, dy)
