"""Memory planners: pure functions from buffer usages to offsets in one arena.

A usage is a size and an inclusive [first, last] range of execution orders; first > last means
the range wraps round the end of an iteration into the next one ([first, end] and [0, last]: a
persistent tensor kept in the arena from the last steps of one iteration into the first of the
next). Two usages whose ranges overlap must not overlap in the arena. Sizes are rounded up to
ALIGN so every view is aligned for numba and BLAS.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ALIGN = 64


class PlanError(RuntimeError):
    """A plan places two live buffers on the same bytes or past the end of the arena."""


@dataclass(frozen=True)
class Usage:
    size: int
    first: int
    last: int  # inclusive; below first: the range wraps round the iteration's end

    @property
    def wraps(self) -> bool:
        return self.last < self.first

    def covers(self, step: int) -> bool:
        if self.wraps:
            return step >= self.first or step <= self.last
        return self.first <= step <= self.last

    def overlaps(self, other: Usage) -> bool:
        if self.wraps and other.wraps:
            return True  # both hold the iteration's end
        if self.wraps:
            return other.last >= self.first or other.first <= self.last
        if other.wraps:
            return self.last >= other.first or self.first <= other.last
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class Plan:
    offsets: tuple[int, ...]
    total: int
    strategy: str


def aligned(size: int, align: int = ALIGN) -> int:
    return (size + align - 1) // align * align


def naive(usages: Sequence[Usage], align: int = ALIGN) -> Plan:
    """Every usage its own bytes, one after the other: the no-reuse baseline."""
    offsets, top = [], 0
    for u in usages:
        offsets.append(top)
        top += aligned(u.size, align)
    return Plan(tuple(offsets), top, "naive")


def _best_fit(usages: Sequence[Usage], order: Sequence[int], align: int) -> tuple[list[int], int]:
    """Place usages in `order`, each into the smallest gap between placed, time-overlapping usages."""
    offsets = [0] * len(usages)
    placed: list[int] = []
    total = 0
    for i in order:
        u = usages[i]
        size = aligned(u.size, align)
        live = sorted(
            (offsets[j], offsets[j] + aligned(usages[j].size, align)) for j in placed if usages[j].overlaps(u)
        )
        best, best_gap, cursor = None, None, 0
        for start, end in live:
            gap = start - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, end)
        offsets[i] = cursor if best is None else best
        placed.append(i)
        total = max(total, offsets[i] + size)
    return offsets, total


def _breadth_order(usages: Sequence[Usage]) -> list[int]:
    """Steps with the most live bytes first; within a step, its usages largest first (TFLite's breadth)."""
    steps = sorted({t for u in usages for t in (u.first, u.last)})
    live = {t: [i for i, u in enumerate(usages) if u.covers(t)] for t in steps}
    breadth = sorted(steps, key=lambda t: -sum(usages[i].size for i in live[t]))
    seen: set[int] = set()
    order = []
    for t in breadth:
        for i in sorted(live[t], key=lambda i: -usages[i].size):
            if i not in seen:
                seen.add(i)
                order.append(i)
    return order


def greedy_by_size(usages: Sequence[Usage], align: int = ALIGN, tries: int = 64) -> Plan:
    """Best fit, largest first (TFLite's greedy-by-size), also tried with other tie-breaks, in
    breadth order and with seeded jitter on the sizes; the smallest arena wins (stops early at the
    lower bound). Each try is O(n^2) over a few hundred buffers."""
    n = range(len(usages))
    floor = lower_bound(usages, align)
    horizon = max((max(u.first, u.last) for u in usages), default=0) + 1
    orders = [
        sorted(n, key=lambda i: (-usages[i].size, usages[i].first, i)),
        sorted(n, key=lambda i: (-usages[i].size, usages[i].first - usages[i].last, i)),
        sorted(n, key=lambda i: (-usages[i].size * _length(usages[i], horizon), i)),
        _breadth_order(usages),
    ]
    rng = random.Random(len(usages))
    best: tuple[list[int], int] | None = None
    for k in range(len(orders) + tries):
        if k < len(orders):
            order = orders[k]
        else:
            order = sorted(n, key=lambda i: (-usages[i].size * rng.uniform(0.5, 1.5), i))
        result = _best_fit(usages, order, align)
        if best is None or result[1] < best[1]:
            best = result
        if best[1] <= floor:
            break
    assert best is not None
    return Plan(tuple(best[0]), best[1], "greedy_by_size")


def _length(u: Usage, horizon: int) -> int:
    """Steps a usage spans (a wrapping one: to the horizon and from 0)."""
    return (horizon - u.first + u.last + 1) if u.wraps else (u.last - u.first + 1)


def lower_bound(usages: Sequence[Usage], align: int = ALIGN) -> int:
    """The most bytes live at any one execution order: no plan can be smaller."""
    if not usages:
        return 0
    events: dict[int, int] = {}
    for u in usages:
        size = aligned(u.size, align)
        events[u.first] = events.get(u.first, 0) + size
        if u.wraps:  # live from first on, and from 0 to last
            events[0] = events.get(0, 0) + size
        events[u.last + 1] = events.get(u.last + 1, 0) - size
    live = peak = 0
    for t in sorted(events):
        live += events[t]
        peak = max(peak, live)
    return peak


def validate(usages: Sequence[Usage], plan: Plan, align: int = ALIGN) -> None:
    """Raise PlanError if two time-overlapping usages share bytes or one runs past the total."""
    spans = []
    for i, u in enumerate(usages):
        off, size = plan.offsets[i], aligned(u.size, align)
        if off < 0 or off + size > plan.total or off % align:
            raise PlanError(f"usage {i} at offset {off} (+{size}) is outside or misaligned in an arena of {plan.total}")
        spans.append((off, off + size, i))
    spans.sort()
    for a in range(len(spans)):
        s0, e0, i0 = spans[a]
        for b in range(a + 1, len(spans)):
            s1, e1, i1 = spans[b]
            if s1 >= e0:
                break
            if usages[i0].overlaps(usages[i1]) and min(e0 - s0, e1 - s1) > 0:
                raise PlanError(f"usages {i0} and {i1} overlap in bytes [{s1}, {min(e0, e1)}) and in time")


PLANNERS: dict[str, Callable[[Sequence[Usage], int], Plan]] = {
    "naive": naive,
    "greedy_by_size": greedy_by_size,
}
