"""Counter-based random numbers: the i-th draw of a stream is splitmix64 of (key, i), a pure
function, so kernels keep no RNG state, every thread gets the same bits for the same key, and a
seed reproduces a result exactly. Dropout masks (fedpers.nn.layers.dropout) and the codecs'
stochastic rounding (fedpers.codec) draw from here; importing it loads numba, not the trainer.
"""

from __future__ import annotations

from numba import float64, njit, uint64

GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's stream increment: 2^64 / the golden ratio, odd
MIX1 = 0xBF58476D1CE4E5B9  # the finalizer's two multipliers (Stafford's mix 13)
MIX2 = 0x94D049BB133111EB
_TWO_POW_53 = 9007199254740992.0

__all__ = ["GOLDEN", "counter_hash", "splitmix64", "uniform01"]


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
