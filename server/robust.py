"""Robust aggregation: coordinate-wise trimmed mean and median, and the norm-bounded mean.

Trimmed mean and median need every delta of the round at once: their memory is
O(devices x model), one float32 row per update, bounded by `memory_bytes`. The bound becomes the
aggregator's `capacity` (updates it can hold), and the coordinator closes a round at that many
updates. Both ignore the example counts an update claims (each update is one row), so a device
inflating its count gains nothing; result() works over column blocks so its temporaries stay
small. The norm-bounded mean (Sun et al. 2019) is the streaming ClippedMean of aggregate.py: each
delta scaled to L2 norm <= clip, then the (capped) example-weighted mean: O(model) memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from fedpers.server.aggregate import (
    AggregationError,
    Aggregator,
    ClippedMean,
    PartialSum,
    WeightedMean,
    check_delta,
)

Arrays = dict[str, np.ndarray]

DEFAULT_MEMORY_MB = 1024.0
_BLOCK = 1 << 16  # columns per block in result(): the sort/partition temporaries are n x _BLOCK


class StackedAggregator(Aggregator):
    """Keeps each delta as a float32 row of an (capacity, params) matrix; subclasses reduce the rows."""

    def __init__(self, memory_bytes: float = DEFAULT_MEMORY_MB * (1 << 20)) -> None:
        super().__init__()
        if not memory_bytes > 0:
            raise ValueError(f"memory bound must be > 0, got {memory_bytes}")
        self.memory_bytes = float(memory_bytes)
        self.capacity: int | None = None
        self._rows = np.empty((0, 0), np.float32)
        self._slices: dict[str, tuple[int, int, tuple[int, ...]]] = {}

    def start(self, round_id: int, base: Mapping[str, np.ndarray]) -> None:
        self.round_id = round_id
        off = 0
        self._slices = {}
        for k in sorted(base):
            shape = tuple(np.shape(base[k]))
            n = math.prod(shape)
            self._slices[k] = (off, off + n, shape)
            off += n
        self.capacity = max(1, int(self.memory_bytes // (4 * max(off, 1))))
        self._rows = np.empty((self.capacity, off), np.float32)  # pages are touched only as rows fill
        self._sums = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        check_delta(self.round_id, delta, weight, {k: shape for k, (_, _, shape) in self._slices.items()})
        assert self.capacity is not None
        if self.count >= self.capacity:
            raise AggregationError(f"the round already holds {self.capacity} updates, the most its memory bound "
                                   f"({self.memory_bytes / (1 << 20):.0f} MiB) allows")
        row = self._rows[self.count]
        for k, (a, b, _) in self._slices.items():
            row[a:b] = np.ravel(delta[k])
        self.total_weight += weight
        self.count += 1

    def _reduce(self, block: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def partial(self, devices: tuple[int, ...] = ()) -> PartialSum:
        """The rows held so far (a copy): robust reductions need every delta, so a partial is its rows."""
        if self.round_id is None:
            raise AggregationError("partial() before start()")
        return PartialSum(self.round_id, "rows", {"rows": self._rows[:self.count].copy()}, self.total_weight,
                          self.count, tuple(sorted(devices)))

    def merge(self, part: PartialSum) -> None:
        """Append another aggregator's rows (same round, same layout), within this one's capacity."""
        self._check_partial(part, "rows")
        rows = part.arrays["rows"]
        assert self.capacity is not None
        if rows.ndim != 2 or rows.shape[1] != self._rows.shape[1] or rows.shape[0] != part.count:
            raise AggregationError(f"partial rows of shape {rows.shape} do not fit "
                                   f"{part.count} x {self._rows.shape[1]}")
        if self.count + part.count > self.capacity:
            raise AggregationError(f"merging {part.count} rows would exceed the {self.capacity} this round can hold")
        self._rows[self.count:self.count + part.count] = rows
        self.total_weight += part.total_weight
        self.count += part.count

    def result(self) -> Arrays | None:
        if self.count == 0:
            return None
        rows = self._rows[:self.count]
        flat = np.empty(rows.shape[1], np.float32)
        for a in range(0, rows.shape[1], _BLOCK):
            flat[a:a + _BLOCK] = self._reduce(rows[:, a:a + _BLOCK])
        return {k: flat[a:b].reshape(shape).copy() for k, (a, b, shape) in self._slices.items()}


class TrimmedMean(StackedAggregator):
    """Per coordinate: drop the `trim` fraction of largest and of smallest values, average the rest."""

    def __init__(self, trim: float = 0.2, memory_bytes: float = DEFAULT_MEMORY_MB * (1 << 20)) -> None:
        super().__init__(memory_bytes)
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.trim = float(trim)

    def fresh(self) -> Aggregator:
        return TrimmedMean(self.trim, self.memory_bytes)

    def _reduce(self, block: np.ndarray) -> np.ndarray:
        n = block.shape[0]
        k = min(int(math.floor(self.trim * n)), (n - 1) // 2)
        if k == 0:
            return block.mean(axis=0, dtype=np.float64).astype(np.float32)
        ordered = np.sort(block, axis=0)
        return ordered[k:n - k].mean(axis=0, dtype=np.float64).astype(np.float32)


class Median(StackedAggregator):
    """Per coordinate: the median of the updates."""

    def fresh(self) -> Aggregator:
        return Median(self.memory_bytes)

    def _reduce(self, block: np.ndarray) -> np.ndarray:
        return np.median(block, axis=0).astype(np.float32)


def make_aggregator(name: str, *, clip_norm: float | None = None, trim: float = 0.2,
                    memory_mb: float = DEFAULT_MEMORY_MB) -> Aggregator:
    """By the names of fedpers.strategies.AGGREGATORS."""
    if name == "mean":
        return WeightedMean() if clip_norm is None else ClippedMean(clip_norm)
    if name == "normbounded":
        if clip_norm is None:
            raise ValueError("aggregation normbounded needs --clip-norm (the L2 bound of each delta)")
        return ClippedMean(clip_norm)
    if name == "trimmed":
        return TrimmedMean(trim, memory_mb * (1 << 20))
    if name == "median":
        return Median(memory_mb * (1 << 20))
    raise ValueError(f"unknown aggregation {name!r}; known: mean, normbounded, trimmed, median")
