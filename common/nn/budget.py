"""Memory budgets: parse sizes, predict a plan's process peak RSS, and pick the fastest plan that fits.

A budget is for the whole process: what it holds already (measured when the plan is chosen: imports,
data, the caller's own objects) plus what training and evaluating under a plan will add. The plan
covers the kernel backend, the memory mode, the lookahead and the micro-batch count, fastest first.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from dataclasses import dataclass

from .modes import KERNEL_BACKENDS
from .spec import ModelSpec

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
MIB = 1 << 20
# What the numba backend adds to a process that has not loaded it: llvmlite, numba and its cached
# kernels (bench/footprint.py measures it: 126 MiB with every kernel module, float32).
NUMBA_BYTES = 130 * MIB
# Besides the arena: Python objects of a plan, the swap thread, allocator slack, BLAS buffers of
# bigger products (calibrated on the shipped nets: predicted - measured peak stays positive).
MARGIN_BYTES = 4 * MIB
DRAW_CHUNK_BYTES = 1 * MIB  # float64 draws and file reads in flight while one layer's weights move
# The RSS a process holds before training varies by a fraction of a MiB between runs of the same
# command: the smallest budget an error names leaves this much room, so that rerunning with it works.
BASELINE_SLACK_BYTES = 2 * MIB


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
    kernels: str = "numpy"
    growth_bytes: int = 0  # predicted: what training and evaluating add to the process
    baseline_bytes: int = 0  # the process's RSS when the plan was chosen

    @property
    def peak_bytes(self) -> int:
        return self.baseline_bytes + self.growth_bytes

    def describe(self) -> str:
        extra = f", lookahead {self.lookahead}" if self.mode.startswith("swap") else ""
        micro = f", micro-batch {self.micro_batch}" if self.micro_batch > 1 else ""
        peak = f", process peak ~{format_size(self.peak_bytes)}" if self.growth_bytes else ""
        return f"memory={self.mode}{extra}{micro}, kernels={self.kernels} (arena {format_size(self.arena_bytes)}{peak})"


def candidates(batch: int, lookaheads: tuple[int, ...] = (4, 2, 1),
               kernels: tuple[str, ...] = ("numpy",)) -> list[tuple[str, str, int, int]]:
    """(kernels, mode, lookahead, micro_batch), fastest first: the kernel backends in the order given,
    then fewer micro-batches, then planned before swap before swap-all, larger lookaheads first."""
    out = []
    for k in kernels:
        for m in (d for d in range(1, batch + 1) if batch % d == 0):
            out.append((k, "planned", lookaheads[-1], m))
            out.extend((k, "swap", la, m) for la in lookaheads)
            out.extend((k, "swap-all", la, m) for la in lookaheads)
    return out


def backends(asked: str | None) -> tuple[str, ...]:
    """The kernel backends a budget may choose from: the one asked for; else numba (faster) when it
    is installed, then numpy."""
    if asked is not None:
        return (asked,)
    have_numba = "numba" in sys.modules or importlib.util.find_spec("numba") is not None
    return tuple(k for k in ("numba", "numpy") if k in KERNEL_BACKENDS and (k != "numba" or have_numba))


def predict_growth(spec: ModelSpec, batch: int, kernels: str, mode: str, lookahead: int, micro_batch: int,
                   optimizer_slots: int, anchored: frozenset[str] = frozenset()) -> tuple[int, int]:
    """(arena bytes, bytes the process grows by) for training and evaluating under this plan.

    Training holds the arena (pages are resident once touched); between fits only the persistent
    tensors it keeps stay, and evaluation adds its own plan (in a training micro-step's batch) and,
    in swap-all mode, copies of the weights read from the swap file. Re-planning draws or moves one
    layer's weights at a time; the numba backend adds its libraries unless already loaded."""
    from .graph import compile as compile_graph
    from .graph import weight_specs

    c = compile_graph(spec, batch, mode=mode, lookahead=lookahead, micro_batch=micro_batch, kernels=kernels,
                      optimizer_slots=optimizer_slots, anchored=anchored, allocate=False)
    weights = weight_specs(spec)
    if c.homes:  # swap-all evaluation reads the weights from the file, a window at a time
        infer = compile_graph(spec, batch // micro_batch, training=False, mode="swap-all", lookahead=lookahead,
                              kernels=kernels, external={k: None for k in weights if k not in c.homes},
                              file_homes={k: c.homes[k] for k in weights if k in c.homes}, allocate=False)
    else:
        infer = compile_graph(spec, batch // micro_batch, training=False, mode="planned", kernels=kernels,
                              external=dict.fromkeys(weights), allocate=False)
    layer_bytes: dict[str, int] = {}
    for w in weights.values():
        layer_bytes[w.layer] = layer_bytes.get(w.layer, 0) + 4 * math.prod(w.shape)
    kept = sum(n for _, n in c.kept_between_fits())
    evaluating = kept + infer.plan.total
    drawing = max(layer_bytes.values(), default=0) + DRAW_CHUNK_BYTES  # one layer's weights, being moved
    growth = max(c.plan.total, evaluating) + drawing + MARGIN_BYTES
    if kernels == "numba" and "numba" not in sys.modules:
        growth += NUMBA_BYTES
    return c.plan.total, growth


def choose(spec: ModelSpec, batch: int, budget: int, optimizer_slots: int,
           anchored: frozenset[str] = frozenset(), *, baseline: int, kernels: str | None = None) -> Choice:
    """The fastest plan whose predicted process peak (baseline + growth) fits `budget`; BudgetError
    naming the smallest budget that works otherwise."""
    smallest: Choice | None = None
    for k, mode, la, m in candidates(batch, kernels=backends(kernels)):
        arena, growth = predict_growth(spec, batch, k, mode, la, m, optimizer_slots, anchored)
        choice = Choice(mode, la, m, arena, k, growth, baseline)
        if choice.peak_bytes <= budget:
            return choice
        if smallest is None or choice.peak_bytes < smallest.peak_bytes:
            smallest = choice
    assert smallest is not None
    need = -(-(smallest.peak_bytes + BASELINE_SLACK_BYTES) // MIB) * MIB
    raise BudgetError(
        f"memory budget {format_size(budget)} is too small for batch {batch}: this process already holds "
        f"{format_size(baseline)} and the smallest plan ({smallest.describe()}) adds about "
        f"{format_size(smallest.growth_bytes)}; raise the budget to at least {need // MIB}MiB or lower the batch size"
    )
