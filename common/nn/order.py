"""Execution order and lifespans: the single source of every tensor's [first, last] step.

Forward steps F_i are numbered 0..n-1 in topological order; backward continues from n with,
for each layer in reverse, calc-gradient, calc-derivative and apply-gradient. A layer without
trainable weights shares one number for all three (NNTrainer's setExecutionOrder).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple


class Life(enum.Flag):
    """Which of its owner's steps touch a tensor."""

    FORWARD = enum.auto()
    CALC_GRAD = enum.auto()
    CALC_DERIV = enum.auto()
    APPLY_GRAD = enum.auto()
    BACKWARD = CALC_GRAD | CALC_DERIV | APPLY_GRAD
    ITERATION = FORWARD | BACKWARD
    NONE = 0


class ExecOrder(NamedTuple):
    forward: int
    calc_grad: int
    calc_deriv: int
    apply_grad: int


def assign(trains: Sequence[bool]) -> list[ExecOrder]:
    """Number the steps of n layers (given in topological order) whose weights train or not."""
    n = len(trains)
    orders: list[ExecOrder | None] = [None] * n
    step = n
    for j in range(n - 1, -1, -1):
        if trains[j]:
            orders[j] = ExecOrder(j, step, step + 1, step + 2)
            step += 3
        else:
            orders[j] = ExecOrder(j, step, step, step)
            step += 1
    return [o for o in orders if o is not None]


def num_steps(orders: Sequence[ExecOrder]) -> int:
    """Steps in one iteration (forward plus backward)."""
    return max(o.apply_grad for o in orders) + 1 if orders else 0


def touches(life: Life, order: ExecOrder) -> tuple[int, ...]:
    """The execution orders at which a tensor with `life`, owned by a layer at `order`, is touched."""
    out = []
    if Life.FORWARD in life:
        out.append(order.forward)
    if Life.CALC_GRAD in life:
        out.append(order.calc_grad)
    if Life.CALC_DERIV in life:
        out.append(order.calc_deriv)
    if Life.APPLY_GRAD in life:
        out.append(order.apply_grad)
    return tuple(sorted(set(out)))
