"""The arena: one numpy byte buffer holding every planned tensor, and typed views into it.

Only offsets are stored; views are made on demand, so the plan stays plain numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .planner import ALIGN, Plan, Usage, validate


class Arena:
    def __init__(self, total: int) -> None:
        raw = np.empty(total + ALIGN, np.uint8)
        shift = (-raw.ctypes.data) % ALIGN
        self.buffer = raw[shift : shift + total]
        self.total = total

    @classmethod
    def from_plan(cls, usages: Sequence[Usage], plan: Plan) -> Arena:
        """Check the plan (bounds, alignment, no overlap of live buffers), then allocate it."""
        validate(usages, plan)
        return cls(plan.total)

    def view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset < 0 or offset + nbytes > self.total:
            raise IndexError(f"view [{offset}, {offset + nbytes}) outside an arena of {self.total} bytes")
        return self.buffer[offset : offset + nbytes].view(dtype).reshape(shape)
