"""Differential privacy settings and the privacy spent, from Google's `dp-accounting` library.

A device that takes part in a round clips its whole shared delta to L2 norm `clip_norm` and adds
Gaussian noise of standard deviation `noise_multiplier * clip_norm` to every value
(`fedpers.client.privacy`). Each released update is then the Gaussian mechanism with sensitivity
`clip_norm` over that device's entire data set (device-level privacy), and the server sees every
released update (there is no secure aggregation), so no amplification by sampling is claimed:
after k rounds a device has spent the k-fold composition of that mechanism, computed here with
the RDP accountant of `dp-accounting`, never by a hand-written formula.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass


class PrivacyError(ValueError):
    """A DP setting is out of range; the message names it."""


@dataclass(frozen=True)
class DPConfig:
    """Device-side clipping and noise; `clip_norm` 0 means no differential privacy."""

    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (self.clip_norm >= 0 and math.isfinite(self.clip_norm)):
            raise PrivacyError(f"dp_clip: must be >= 0, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(f"dp_noise: must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"dp_delta: must be in (0, 1), got {self.delta}")
        if self.noise_multiplier > 0 and self.clip_norm == 0:
            raise PrivacyError("dp_noise needs dp_clip > 0 (noise is scaled by the clipping norm)")

    @property
    def enabled(self) -> bool:
        return self.clip_norm > 0


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The epsilon a device has spent after `rounds` releases of the Gaussian mechanism with this
    noise multiplier, at `delta` (RDP accountant of dp-accounting); inf without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting logs through absl at WARNING
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


def epsilon_of(noise_multipliers: list[float], delta: float) -> float:
    """The epsilon spent by a device whose released updates had these noise multipliers (one per
    round it took part in), at `delta`; 0 for none, inf if any release had no noise."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    if len(set(noise_multipliers)) == 1:
        return epsilon(noise_multipliers[0], len(noise_multipliers), delta)
    logging.getLogger("absl").setLevel(logging.ERROR)
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    for sigma in sorted(set(noise_multipliers)):
        accountant.compose(dp_accounting.GaussianDpEvent(sigma), noise_multipliers.count(sigma))
    return float(accountant.get_epsilon(delta))
