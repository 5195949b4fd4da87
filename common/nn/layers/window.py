"""Sliding-window geometry shared by conv2d and pooling2d: padding, output size, and which output
positions a kernel offset touches (fedpers.nn.jit.window has the numba twin of column_range)."""

from __future__ import annotations

from ..spec import Padding

KERNELS = ("column_range",)


def resolve_padding(
    padding: Padding | None, size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding; 'same' pads as Keras/NNTrainer (extra on bottom/right)."""
    if padding is None or padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for n, k, s in zip(size, kernel, stride, strict=True):
            out = -(-n // s)
            total = max((out - 1) * s + k - n, 0)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    ph, pw = padding
    return (ph, ph, pw, pw)


def output_size(n: int, k: int, s: int, before: int, after: int) -> int:
    """Window positions along one axis of n values padded by before/after: kernel k, stride s."""
    return (n + before + after - k) // s + 1


def column_range(kj: int, sw: int, pl: int, w: int, ow: int) -> tuple[int, int]:
    """Output columns j whose window column j*sw - pl + kj lies inside [0, w) (rows alike)."""
    off = kj - pl
    j0 = 0 if off >= 0 else min((-off + sw - 1) // sw, ow)
    j1 = min((w - 1 - off) // sw + 1, ow) if w - 1 - off >= 0 else 0
    return j0, max(j0, j1)


def offset_block(k: int, s: int, p: int, n: int, o: int) -> tuple[int, int, slice] | None:
    """For kernel offset k along one axis: the output range [i0, i1) whose input index i*s + k - p is
    inside [0, n), and the input slice it reads; None when no output touches the input."""
    i0, i1 = column_range(k, s, p, n, o)
    if i1 <= i0:
        return None
    r0 = i0 * s + k - p
    return i0, i1, slice(r0, r0 + (i1 - i0 - 1) * s + 1, s)
