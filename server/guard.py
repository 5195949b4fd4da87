"""What the server refuses to publish or to fold in, beyond an update's format: bounded influence.

- `default_norm_bound`: when `--norm-bound` is not given, updates are still bounded, by a multiple
  of the served model's own L2 norm (an honest delta is a step away from the base, not a new model).
- `check_update`: batch-norm running variances must stay >= 0 once the delta is applied (devices
  send running statistics lossless, fedpers.codec.codec_for; float32 rounding of base + delta is
  forgiven up to VARIANCE_TOLERANCE and clamped to 0).
- `check_model`: a model about to be published must be finite and have running variances >= 0;
  otherwise the version is refused (UnsafeModel) and the last good one is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from fedpers.server.errors import BadUpdate

VARIANCE_SUFFIXES = (".running_var",)
NORM_BOUND_FACTOR = 4.0  # default norm bound = this x the L2 norm of the shared weights at startup
MIN_NORM_BOUND = 1.0  # ... but never below this (a model whose weights start near zero)
VARIANCE_TOLERANCE = 1e-6  # float32 rounding of base + (trained - base) near zero, relative to 1 + |base|


class UnsafeModel(RuntimeError):
    """The next model would not be safe to serve (NaN/Inf, negative variance); it is not published."""


def is_variance(name: str) -> bool:
    return name.endswith(VARIANCE_SUFFIXES)


def default_norm_bound(shared: Mapping[str, np.ndarray]) -> float:
    """NORM_BOUND_FACTOR x the global L2 norm of the shared weights, at least MIN_NORM_BOUND."""
    norm = math.sqrt(sum(float(np.vdot(a, a)) for a in (np.asarray(v, np.float64) for v in shared.values())))
    return max(MIN_NORM_BOUND, NORM_BOUND_FACTOR * norm)


def dp_norm_bound(clip_norm: float, noise_multiplier: float, params: int) -> float:
    """A bound no honest DP update exceeds: its clipped norm plus 4x the expected norm of its noise
    (sigma x clip x sqrt(params)); devices send DP updates without error feedback, and int2 adds ~1.5x."""
    return clip_norm * (1.0 + 4.0 * noise_multiplier * math.sqrt(max(params, 1)))


def check_update(base: Mapping[str, np.ndarray], delta: dict[str, np.ndarray]) -> None:
    """BadUpdate when a running variance would become negative; rounding-sized negatives are
    clamped in `delta` (so base + delta >= 0 exactly)."""
    for k, d in delta.items():
        if is_variance(k) and d.size:
            new = base[k] + d
            low = float(np.min(new))
            if low < -VARIANCE_TOLERANCE * (1.0 + float(np.max(np.abs(base[k])))):
                raise BadUpdate(f"tensor {k!r}: base + delta makes a batch-norm running variance negative ({low:.4g})")
            if low < 0:
                delta[k] = np.maximum(d, -base[k]).astype(np.float32)


def clamp_rounding(weights: dict[str, np.ndarray]) -> None:
    """Running variances a hair below 0 from float rounding of the mean become 0 (in place)."""
    for k, w in weights.items():
        if is_variance(k) and w.size and float(np.min(w)) < 0:
            if float(np.min(w)) >= -VARIANCE_TOLERANCE * (1.0 + float(np.max(np.abs(w)))):
                weights[k] = np.maximum(w, 0).astype(np.float32)


def check_model(weights: Mapping[str, np.ndarray]) -> None:
    """UnsafeModel when any tensor holds NaN/Inf or a running variance is negative."""
    for k, w in weights.items():
        if not np.isfinite(w).all():
            raise UnsafeModel(f"tensor {k!r} would hold NaN or Inf")
        if is_variance(k) and w.size and float(np.min(w)) < 0:
            raise UnsafeModel(f"batch-norm running variance {k!r} would be negative ({float(np.min(w)):.4g})")
