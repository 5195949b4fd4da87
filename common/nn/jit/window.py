"""numba twin of fedpers.nn.layers.window.column_range, for the conv and pooling kernels."""

from __future__ import annotations

from numba import njit

KERNELS = ("column_range",)


@njit("UniTuple(int64, 2)(int64, int64, int64, int64, int64)", cache=True, nogil=True)
def column_range(kj, sw, pl, w, ow):
    """Output columns j whose window column j*sw - pl + kj lies inside [0, w)."""
    off = kj - pl
    j0 = 0 if off >= 0 else min((-off + sw - 1) // sw, ow)
    j1 = min((w - 1 - off) // sw + 1, ow) if w - 1 - off >= 0 else 0
    return j0, max(j0, j1)
