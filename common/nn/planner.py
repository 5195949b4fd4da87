"""Memory planners: pure functions from buffer usages to offsets in one arena.

A usage is a size and an inclusive [first, last] range of execution orders. Two usages whose
ranges overlap must not overlap in the arena. Sizes are rounded up to ALIGN so every view is
aligned for numba and BLAS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

ALIGN = 64


class PlanError(RuntimeError):
    """A plan places two live buffers on the same bytes or past the end of the arena."""


@dataclass(frozen=True)
class Usage:
    size: int
    first: int
    last: int  # inclusive


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


def greedy_by_size(usages: Sequence[Usage], align: int = ALIGN) -> Plan:
    """Largest first; each into the smallest gap between placed, time-overlapping usages (best fit)."""
    order = sorted(range(len(usages)), key=lambda i: (-usages[i].size, usages[i].first, i))
    offsets = [0] * len(usages)
    placed: list[int] = []
    total = 0
    for i in order:
        u = usages[i]
        size = aligned(u.size, align)
        live = sorted(
            (offsets[j], offsets[j] + aligned(usages[j].size, align))
            for j in placed
            if usages[j].first <= u.last and u.first <= usages[j].last
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
    return Plan(tuple(offsets), total, "greedy_by_size")


def lower_bound(usages: Sequence[Usage], align: int = ALIGN) -> int:
    """The most bytes live at any one execution order: no plan can be smaller."""
    if not usages:
        return 0
    events: dict[int, int] = {}
    for u in usages:
        events[u.first] = events.get(u.first, 0) + aligned(u.size, align)
        events[u.last + 1] = events.get(u.last + 1, 0) - aligned(u.size, align)
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
        spans.append((off, off + size, u.first, u.last, i))
    spans.sort()
    for a in range(len(spans)):
        s0, e0, f0, l0, i0 = spans[a]
        for b in range(a + 1, len(spans)):
            s1, e1, f1, l1, i1 = spans[b]
            if s1 >= e0:
                break
            if f0 <= l1 and f1 <= l0 and min(e0 - s0, e1 - s1) > 0:
                raise PlanError(f"usages {i0} and {i1} overlap in bytes [{s1}, {min(e0, e1)}) and in time")


PLANNERS: dict[str, Callable[[Sequence[Usage], int], Plan]] = {
    "naive": naive,
    "greedy_by_size": greedy_by_size,
}
