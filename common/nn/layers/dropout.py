"""Inverted dropout: in training each element is kept with probability 1 - rate and scaled by
1 / (1 - rate); in evaluation the layer is the identity. Works in place (forward and derivative).

The keep mask is a uint8 scratch (forward -> calc-derivative). Its random bits come from a
counter-based hash (fedpers.rng: splitmix64 of seed and element index), with one seed per forward
drawn from run.state.rng (the node's numpy Generator, seeded by the graph): reproducible, no
allocation, and the same mask for the same seed whatever the thread. run.state.active remembers
whether the last forward applied a mask, for calc_derivative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...rng import GOLDEN, MASK64, counter_hash_into
from ..order import Life
from .base import InitContext, Layer, LayerState, RunContext, Shape, register
from .kernels import for_backend

KERNELS = ("dropout_forward", "dropout_backward")
BITS = 24  # uniform draws of 24 bits: the rate is resolved to 1 / 16M
CHUNK = 16384  # draws per numpy pass: the hash scratch is (2, CHUNK) uint64 (256 KiB)


def dropout_forward(x, out, mask, rate, seed, *, hashes) -> None:
    """mask[i] = 1 with probability 1 - rate (from hash(seed, i)); out = x * mask / (1 - rate); out may
    alias x. hashes: (2, CHUNK) uint64 scratch, the draws of one chunk at a time."""
    threshold = np.uint64(int(rate * (1 << BITS)))
    key = (int(seed) * GOLDEN) & MASK64
    keep = mask.view(np.bool_)
    h, tmp = hashes[0], hashes[1]
    for start in range(0, x.size, h.size):
        m = min(h.size, x.size - start)
        counter_hash_into(key, start, h[:m], tmp[:m])
        np.right_shift(h[:m], np.uint64(64 - BITS), out=h[:m])
        np.greater_equal(h[:m], threshold, out=keep[start : start + m])
    np.multiply(x, keep, out=out)
    np.multiply(out, out.dtype.type(1.0 / (1.0 - rate)), out=out)


def dropout_backward(dy, mask, rate, dx) -> None:
    """dx = dy * mask / (1 - rate); dx may alias dy."""
    np.multiply(dy, mask.view(np.bool_), out=dx)
    np.multiply(dx, dx.dtype.type(1.0 / (1.0 - rate)), out=dx)


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
        self.k = for_backend(__name__, ctx.kernels)
        self.mask = self.hashes = None
        if self.rate > 0.0:
            self.mask = ctx.request_tensor("mask", shape, Life.FORWARD | Life.CALC_DERIV, np.uint8)
            if ctx.kernels == "numpy":
                n = math.prod(shape)
                self.hashes = ctx.request_tensor("hashes", (2, min(CHUNK, n)), Life.FORWARD, np.uint64)
        ctx.inplace = True
        ctx.deriv_inplace = True
        return shape

    def forward(self, run: RunContext, training: bool) -> None:
        x, out = run.input(), run.output()
        state: DropoutState = run.state
        active = state.active = training and self.mask is not None
        if active:
            seed = int(state.rng.integers(0, 2**63))
            extra = {} if self.hashes is None else {"hashes": run.tensor(self.hashes)}
            self.k.dropout_forward(
                x.reshape(-1), out.reshape(-1), run.tensor(self.mask).reshape(-1), self.rate, np.uint64(seed), **extra
            )
        elif not run.aliased:
            np.copyto(out, x)

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is None:
            return
        dy = run.dout()
        if run.state.active:
            self.k.dropout_backward(dy.reshape(-1), run.tensor(self.mask).reshape(-1), self.rate, din.reshape(-1))
        elif not np.shares_memory(din, dy):
            np.copyto(din, dy)
