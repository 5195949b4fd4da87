"""The kernels of fedpers.codec in plain numpy: per-chunk quantization with stochastic rounding
(int8 and the packed int4/int2) and LEB128 index gaps (top-k). Vectorized over blocks of values,
so a device encodes without numba (and a server decodes without it). Kept apart so that importing
fedpers.codec (codec names, parsing, CLI help) stays light: the codec imports this module on its
first encode/decode.

Bit for bit what the numba kernels of the first version computed: the same float64 arithmetic per
value (x * (1 / scale) + u, floor, clamp) and the same counter-based draws (fedpers.rng).
"""

from __future__ import annotations

import numpy as np

from .rng import MASK64, counter_hash_into

__all__ = [
    "int8_dequantize", "int8_quantize", "packed_dequantize", "packed_quantize", "varint_gaps_decode",
    "varint_gaps_encode",
]  # fmt: skip

BLOCK = 1 << 16  # values per vectorized block: bounds the temporaries (~1.5 MiB)
_INV_TWO_POW_53 = 1.0 / 9007199254740992.0


def chunk_scales(x: np.ndarray, chunk: int, levels: float, scales: np.ndarray) -> None:
    """scales[c] = float32(max |x| over chunk c / levels), the max taken in float64 as before."""
    n = x.size
    full = n // chunk
    amax = np.empty(len(scales), np.float64)
    if full:
        amax[:full] = np.abs(x[: full * chunk].reshape(full, chunk)).max(axis=1)
    if full < len(scales):
        amax[full] = np.abs(x[full * chunk :]).max()
    np.copyto(scales, amax / levels, casting="same_kind")


def _stochastic_codes(x: np.ndarray, chunk: int, levels: float, seed: int, scales: np.ndarray):
    """Yield (start, stop, v) per block: v = clamp(floor(x * (1 / scale) + u), -levels, levels) as
    float64, 0 where the chunk's scale is 0; u is draw i of the stream at `seed`."""
    n = x.size
    inv = np.zeros(len(scales), np.float64)
    nz = scales != 0
    inv[nz] = 1.0 / scales[nz].astype(np.float64)
    h = np.empty(min(BLOCK, max(n, 1)), np.uint64)
    tmp = np.empty_like(h)
    u = np.empty(len(h), np.float64)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        m = stop - start
        counter_hash_into(int(seed) & MASK64, start, h[:m], tmp[:m])
        np.right_shift(h[:m], np.uint64(11), out=h[:m])
        np.multiply(h[:m], _INV_TWO_POW_53, out=u[:m])
        chunk_of = np.arange(start, stop) // chunk
        v = x[start:stop].astype(np.float64) * inv[chunk_of]
        v += u[:m]
        np.floor(v, out=v)
        np.clip(v, -levels, levels, out=v)
        v[~nz[chunk_of]] = 0.0
        yield start, stop, v


def int8_quantize(x: np.ndarray, chunk: int, levels: float, seed, q: np.ndarray, scales: np.ndarray) -> None:
    """Per-chunk scale absmax / levels; q = floor(x / scale + u), u ~ U[0, 1): unbiased, |error| < scale."""
    chunk_scales(x, chunk, levels, scales)
    for start, stop, v in _stochastic_codes(x, chunk, levels, seed, scales):
        np.copyto(q[start:stop], v, casting="unsafe")


def int8_dequantize(q: np.ndarray, scales: np.ndarray, chunk: int, out: np.ndarray) -> None:
    np.multiply(q.astype(np.float32), np.repeat(scales, chunk)[: q.size], out=out)


def packed_quantize(x: np.ndarray, chunk: int, bits: int, levels: int, seed, packed: np.ndarray,
                    scales: np.ndarray) -> None:
    """Low-bit version of int8_quantize: q in [-levels, levels] stored as q + levels in `bits` bits,
    8 // bits values per byte, lowest bits first."""
    vpb = 8 // bits
    chunk_scales(x, chunk, float(levels), scales)
    codes = np.zeros(len(packed) * vpb, np.uint8)
    for start, stop, v in _stochastic_codes(x, chunk, float(levels), seed, scales):
        v += levels
        np.copyto(codes[start:stop], v, casting="unsafe")
    shifts = (np.arange(vpb, dtype=np.uint8) * bits).astype(np.uint8)
    np.bitwise_or.reduce(codes.reshape(-1, vpb) << shifts, axis=1, out=packed)


def packed_dequantize(packed: np.ndarray, scales: np.ndarray, chunk: int, bits: int, levels: int,
                      out: np.ndarray) -> int:
    """Inverse of packed_quantize; returns -1 on a code above 2 * levels or non-zero padding bits."""
    n = out.shape[0]
    vpb = 8 // bits
    shifts = (np.arange(vpb, dtype=np.uint8) * bits).astype(np.uint8)
    codes = ((packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)
    if (codes[n:] != 0).any() or (codes[:n] > 2 * levels).any():
        return -1
    np.multiply((codes[:n].astype(np.int64) - levels).astype(np.float32), np.repeat(scales, chunk)[:n], out=out)
    return 0


def varint_gaps_encode(idx: np.ndarray, out: np.ndarray) -> int:
    """Sorted indices -> LEB128 varints of their gaps (first gap from 0) in `out`; returns bytes used."""
    if not len(idx):
        return 0
    gaps = np.diff(idx, prepend=0).astype(np.uint64)
    lengths = np.ones(len(gaps), np.int64)
    for k in range(1, 10):
        lengths += gaps >= np.uint64(1 << (7 * k))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for k in range(int(lengths.max())):
        has = lengths > k
        byte = (gaps[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        byte |= np.where(lengths[has] > k + 1, np.uint64(0x80), np.uint64(0))
        out[starts[has] + k] = byte.astype(np.uint8)
    return int(ends[-1])


def varint_gaps_decode(buf: np.ndarray, n: int, idx: np.ndarray) -> int:
    """LEB128 gaps -> indices in `idx`. Returns 0, or -1 if the stream is malformed, does not hold
    exactly len(idx) varints, or the indices are not strictly increasing and below n."""
    k = len(idx)
    size = len(buf)
    if k == 0:
        return 0 if size == 0 else -1
    ends = np.flatnonzero(buf < 0x80)  # the last byte of each varint
    if len(ends) < k or size == 0:
        return -1
    if len(ends) > k or ends[-1] != size - 1:
        return -1  # trailing bytes, or the last varint unterminated
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 9:  # more than 63 bits
        return -1
    within = np.arange(size) - np.repeat(starts, lengths)
    parts = (buf.astype(np.uint64) & np.uint64(0x7F)) << (within.astype(np.uint64) * np.uint64(7))
    gaps = np.add.reduceat(parts, starts)
    if (gaps >= np.uint64(n)).any() or (gaps[1:] == 0).any():
        return -1
    cur = np.cumsum(gaps)  # exact up to the first value >= n, which is refused
    if (cur >= np.uint64(n)).any():
        return -1
    np.copyto(idx, cur, casting="unsafe")
    return 0
