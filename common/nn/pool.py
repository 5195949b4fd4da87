"""The arena: one numpy byte buffer holding every planned tensor, and typed views into it.

Only offsets are stored; views are made on demand, so the plan stays plain numbers. The buffer is
an anonymous memory mapping: its pages become resident when first touched, and `release()` gives
them back to the system (their contents become zeros) without touching the views.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np

from .planner import Plan, Usage, validate

PAGE = mmap.PAGESIZE


class Arena:
    def __init__(self, total: int) -> None:
        self._map = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.buffer = np.frombuffer(self._map, np.uint8, count=total)  # page-aligned, so ALIGN-aligned
        self.total = total

    @classmethod
    def from_plan(cls, usages: Sequence[Usage], plan: Plan) -> Arena:
        """Check the plan (bounds, alignment, no overlap of live buffers), then allocate it."""
        validate(usages, plan)
        return cls(plan.total)

    def release(self, keep: Sequence[tuple[int, int]] = ()) -> int:
        """Give the pages outside the `keep` ranges (offset, bytes) back to the system: they read as
        zeros afterwards. Returns the bytes released (whole pages)."""
        edges = sorted((o, o + n) for o, n in keep if n > 0)
        free, cursor = [], 0
        for start, end in edges:
            free.append((cursor, start))
            cursor = max(cursor, end)
        free.append((cursor, self.total))
        released = 0
        for start, end in free:
            lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE  # whole pages inside the gap
            if hi > lo:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                released += hi - lo
        return released

    def view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset < 0 or offset + nbytes > self.total:
            raise IndexError(f"view [{offset}, {offset + nbytes}) outside an arena of {self.total} bytes")
        return self.buffer[offset : offset + nbytes].view(dtype).reshape(shape)
