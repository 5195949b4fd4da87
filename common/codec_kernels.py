"""The numba kernels of fedpers.codec: per-chunk quantization with stochastic rounding (int8 and the
packed int4/int2) and LEB128 index gaps (top-k). Kept apart so that importing fedpers.codec (codec
names, parsing, CLI help) loads no numba: the codec imports this module on its first encode/decode.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .rng import uniform01

__all__ = [
    "int8_dequantize", "int8_quantize", "packed_dequantize", "packed_quantize", "varint_gaps_decode",
    "varint_gaps_encode",
]  # fmt: skip


@njit("float32(float32[::1], int64, int64, float64)", cache=True, nogil=True)
def chunk_scale(x, lo, hi, levels):
    """absmax of x[lo:hi] / levels: the step that maps the chunk onto [-levels, levels]."""
    amax = 0.0
    for i in range(lo, hi):
        a = abs(np.float64(x[i]))
        if a > amax:
            amax = a
    return np.float32(amax / levels)


@njit("void(float32[::1], int64, float64, uint64, int8[::1], float32[::1])", cache=True, nogil=True)
def int8_quantize(x, chunk, levels, seed, q, scales):
    """Per-chunk scale absmax / levels; q = floor(x / scale + u), u ~ U[0, 1): unbiased, |error| < scale."""
    n = x.shape[0]
    nchunks = scales.shape[0]
    for c in range(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        scale = chunk_scale(x, lo, hi, levels)
        scales[c] = scale
        if scale == 0.0:
            for i in range(lo, hi):
                q[i] = 0
            continue
        inv = 1.0 / np.float64(scale)
        for i in range(lo, hi):
            v = math.floor(np.float64(x[i]) * inv + uniform01(seed, i))
            if v > levels:
                v = levels
            elif v < -levels:
                v = -levels
            q[i] = np.int8(v)


@njit("void(int8[::1], float32[::1], int64, float32[::1])", cache=True, nogil=True)
def int8_dequantize(q, scales, chunk, out):
    n = q.shape[0]
    for i in range(n):
        out[i] = np.float32(q[i]) * scales[i // chunk]


@njit("void(float32[::1], int64, int64, int64, uint64, uint8[::1], float32[::1])", cache=True, nogil=True)
def packed_quantize(x, chunk, bits, levels, seed, packed, scales):
    """Low-bit version of int8_quantize: q in [-levels, levels] stored as q + levels in `bits` bits,
    8 // bits values per byte, lowest bits first."""
    n = x.shape[0]
    vpb = 8 // bits
    for j in range(packed.shape[0]):
        packed[j] = 0
    for c in range(scales.shape[0]):
        lo = c * chunk
        hi = min(lo + chunk, n)
        scale = chunk_scale(x, lo, hi, levels)
        scales[c] = scale
        inv = 1.0 / np.float64(scale) if scale != 0.0 else 0.0
        for i in range(lo, hi):
            v = math.floor(np.float64(x[i]) * inv + uniform01(seed, i)) if scale != 0.0 else 0.0
            if v > levels:
                v = levels
            elif v < -levels:
                v = -levels
            code = np.int64(v) + levels
            packed[i // vpb] |= np.uint8(code << ((i % vpb) * bits))


@njit("int64(uint8[::1], float32[::1], int64, int64, int64, float32[::1])", cache=True, nogil=True)
def packed_dequantize(packed, scales, chunk, bits, levels, out):
    """Inverse of packed_quantize; returns -1 on a code above 2 * levels or non-zero padding bits."""
    n = out.shape[0]
    vpb = 8 // bits
    mask = (1 << bits) - 1
    for i in range(packed.shape[0] * vpb):
        code = (np.int64(packed[i // vpb]) >> ((i % vpb) * bits)) & mask
        if i >= n:
            if code != 0:
                return -1
            continue
        if code > 2 * levels:
            return -1
        out[i] = np.float32(code - levels) * scales[i // chunk]
    return 0


@njit("int64(int64[::1], uint8[::1])", cache=True, nogil=True)
def varint_gaps_encode(idx, out):
    """Sorted indices -> LEB128 varints of their gaps (first gap from 0) in `out`; returns bytes used."""
    pos = 0
    prev = np.int64(0)
    for j in range(idx.shape[0]):
        g = np.uint64(idx[j] - prev)
        prev = idx[j]
        while g >= np.uint64(0x80):
            out[pos] = np.uint8((g & np.uint64(0x7F)) | np.uint64(0x80))
            g >>= np.uint64(7)
            pos += 1
        out[pos] = np.uint8(g)
        pos += 1
    return pos


@njit("int64(uint8[::1], int64, int64[::1])", cache=True, nogil=True)
def varint_gaps_decode(buf, n, idx):
    """LEB128 gaps -> indices in `idx`. Returns 0, or -1 if the stream is malformed, does not hold
    exactly len(idx) varints, or the indices are not strictly increasing and below n."""
    pos = 0
    size = buf.shape[0]
    cur = np.int64(-1)
    for j in range(idx.shape[0]):
        g = np.uint64(0)
        shift = np.uint64(0)
        while True:
            if pos >= size or shift > np.uint64(56):
                return -1
            b = np.uint64(buf[pos])
            pos += 1
            g |= (b & np.uint64(0x7F)) << shift
            if b < np.uint64(0x80):
                break
            shift += np.uint64(7)
        if g >= np.uint64(n) or (j > 0 and g == np.uint64(0)):
            return -1
        cur = np.int64(g) if j == 0 else cur + np.int64(g)
        if cur >= n:
            return -1
        idx[j] = cur
    if pos != size:
        return -1
    return 0
