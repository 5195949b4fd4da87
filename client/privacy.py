"""Device-side differential privacy: clip the whole shared delta, then add Gaussian noise.

The noise comes from the operating system's entropy (never from a seed the server could know),
so the server cannot subtract it. What a device has spent is computed by `fedpers.privacy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def clip_and_noise(deltas: Mapping[str, np.ndarray], clip_norm: float, noise_multiplier: float,
                   rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Scale the deltas together to global L2 norm <= clip_norm, then add N(0, (noise_multiplier *
    clip_norm)^2) to every value; float32 out."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    rng = rng if rng is not None else np.random.default_rng()
    norm = math.sqrt(sum(float(np.vdot(d, d)) for d in (np.asarray(v, np.float64) for v in deltas.values())))
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    std = noise_multiplier * clip_norm
    out = {}
    for k, d in deltas.items():
        noisy = np.asarray(d, np.float32) * np.float32(scale)
        if std > 0:
            noisy = noisy + rng.normal(0.0, std, size=noisy.shape).astype(np.float32)
        out[k] = noisy.astype(np.float32, copy=False)
    return out


def privatize_weights(trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], shared: Sequence[str],
                      clip_norm: float, noise_multiplier: float) -> dict[str, np.ndarray]:
    """The shared weights a device sends, so that (sent - base) is its clipped, noised delta."""
    deltas = {k: np.asarray(trained[k], np.float32) - np.asarray(base[k], np.float32) for k in shared}
    private = clip_and_noise(deltas, clip_norm, noise_multiplier)
    return {**trained, **{k: (np.asarray(base[k], np.float32) + private[k]) for k in shared}}
