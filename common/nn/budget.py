"""Memory budgets: parse sizes and pick the fastest memory mode that fits a budget."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .spec import ModelSpec

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


class BudgetError(ValueError):
    """Nothing fits the memory budget at this batch size; the message names the smallest that would."""


def parse_size(text: str | int) -> int:
    """'48MiB' -> 50331648; also 48MB, 1.5GiB, 123456 (bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 48MiB, 512MB, 2GiB or bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


@dataclass(frozen=True)
class Choice:
    mode: str
    lookahead: int
    micro_batch: int
    arena_bytes: int

    def describe(self) -> str:
        extra = f", lookahead {self.lookahead}" if self.mode == "swap" else ""
        micro = f", micro-batch {self.micro_batch}" if self.micro_batch > 1 else ""
        return f"memory={self.mode}{extra}{micro} (arena {format_size(self.arena_bytes)})"


def candidates(batch: int, lookaheads: tuple[int, ...] = (4, 2, 1)) -> list[tuple[str, int, int]]:
    """(mode, lookahead, micro_batch), fastest first: fewer micro-batches, then planned before swap."""
    out = []
    for m in (d for d in range(1, batch + 1) if batch % d == 0):
        out.append(("planned", lookaheads[-1], m))
        out.extend(("swap", la, m) for la in lookaheads)
    return out


def choose(spec: ModelSpec, batch: int, budget: int, optimizer_slots: int,
           anchored: frozenset[str] = frozenset()) -> Choice:
    """The first candidate whose arena fits `budget` (proximal anchors included); BudgetError naming
    the smallest otherwise."""
    from .graph import compile as compile_graph

    smallest: Choice | None = None
    for mode, la, m in candidates(batch):
        c = compile_graph(spec, batch, mode=mode, lookahead=la, micro_batch=m,
                          optimizer_slots=optimizer_slots, anchored=anchored, allocate=False)
        choice = Choice(mode, la, m, c.plan.total)
        if choice.arena_bytes <= budget:
            return choice
        if smallest is None or choice.arena_bytes < smallest.arena_bytes:
            smallest = choice
    assert smallest is not None
    raise BudgetError(
        f"memory budget {format_size(budget)} is too small for batch {batch}: the smallest plan needs "
        f"{format_size(smallest.arena_bytes)} ({smallest.arena_bytes} bytes) with {smallest.describe()}; "
        f"raise the budget to at least that or lower the batch size"
    )
