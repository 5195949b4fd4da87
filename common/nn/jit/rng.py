"""numba twin of fedpers.rng: the counter-based stream (splitmix64 of key + (i + 1) * golden) that
dropout masks draw from, bit for bit the same as the numpy functions there."""

from __future__ import annotations

from numba import float64, njit, uint64

from ...rng import GOLDEN, MIX1, MIX2

KERNELS = ("splitmix64", "counter_hash", "uniform01")
_TWO_POW_53 = 9007199254740992.0


@njit("uint64(uint64)", cache=True, nogil=True)
def splitmix64(z):
    """The splitmix64 finalizer: a well-mixed 64-bit hash of z."""
    z = (z ^ (z >> uint64(30))) * uint64(MIX1)
    z = (z ^ (z >> uint64(27))) * uint64(MIX2)
    return z ^ (z >> uint64(31))


@njit("uint64(uint64, int64)", cache=True, nogil=True)
def counter_hash(key, i):
    """Draw i (from 0) of the splitmix64 stream that starts at `key`: 64 random bits."""
    return splitmix64(key + uint64(i + 1) * uint64(GOLDEN))


@njit("float64(uint64, int64)", cache=True, nogil=True)
def uniform01(key, i):
    """Draw i of the stream at `key` as a uniform double in [0, 1) (its top 53 bits)."""
    return float64(counter_hash(key, i) >> uint64(11)) * (1.0 / _TWO_POW_53)
