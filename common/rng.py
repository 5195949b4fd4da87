"""Counter-based random numbers: the i-th draw of a stream is splitmix64 of (key, i), a pure
function, so kernels keep no RNG state, every thread gets the same bits for the same key, and a
seed reproduces a result exactly. Dropout masks (fedpers.nn.layers.dropout) and the codecs'
stochastic rounding (fedpers.codec) draw from here.

Plain numpy (uint64 arithmetic wraps modulo 2^64, as the hash wants); `fedpers.nn.jit.rng` holds
the numba twins the jitted dropout kernel calls, bit for bit the same.
"""

from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's stream increment: 2^64 / the golden ratio, odd
MIX1 = 0xBF58476D1CE4E5B9  # the finalizer's two multipliers (Stafford's mix 13)
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
_INV_TWO_POW_53 = 1.0 / 9007199254740992.0

__all__ = ["GOLDEN", "counter_hash", "counter_hash_into", "splitmix64", "uniform01"]


def _mix_into(z: np.ndarray, tmp: np.ndarray) -> None:
    """z = splitmix64's finalizer of z, in place (tmp: scratch of z's shape, both uint64)."""
    np.right_shift(z, 30, out=tmp)
    np.bitwise_xor(z, tmp, out=z)
    np.multiply(z, np.uint64(MIX1), out=z)
    np.right_shift(z, 27, out=tmp)
    np.bitwise_xor(z, tmp, out=z)
    np.multiply(z, np.uint64(MIX2), out=z)
    np.right_shift(z, 31, out=tmp)
    np.bitwise_xor(z, tmp, out=z)


def counter_hash_into(key: int, start: int, out: np.ndarray, tmp: np.ndarray) -> None:
    """out[k] = draw start + k of the stream at `key` (64 random bits), for k < len(out).
    out and tmp are 1-d uint64 buffers of one length; nothing is allocated."""
    if not len(out):
        return
    out.fill(np.uint64(GOLDEN))
    out[0] = (int(key) + (int(start) + 1) * GOLDEN) & MASK64
    np.cumsum(out, out=out)  # key + (start + 1 + k) * golden, modulo 2^64
    _mix_into(out, tmp)


def splitmix64(z) -> np.ndarray:
    """The splitmix64 finalizer of each value of z (an array of uint64, or one value)."""
    a = np.array(z, dtype=np.uint64, ndmin=1)
    _mix_into(a, np.empty_like(a))
    return a.reshape(np.shape(z))


def counter_hash(key: int, i) -> np.ndarray:
    """Draw(s) i (from 0) of the splitmix64 stream that starts at `key`: 64 random bits each."""
    idx = np.array(i, dtype=np.uint64, ndmin=1)
    z = np.multiply(idx + np.uint64(1), np.uint64(GOLDEN))
    np.add(z, np.uint64(int(key) & MASK64), out=z)
    _mix_into(z, np.empty_like(z))
    return z.reshape(np.shape(i))


def uniform01(key: int, i) -> np.ndarray:
    """Draw(s) i of the stream at `key` as uniform doubles in [0, 1) (the top 53 bits)."""
    h = counter_hash(key, i)
    return np.right_shift(h, np.uint64(11)) * _INV_TWO_POW_53
