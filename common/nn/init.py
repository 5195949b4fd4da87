"""Weight initializers by name (the INI's weight_initializer / bias_initializer values)."""

from __future__ import annotations

import numpy as np

from .layers.base import WeightRequest


def initialize(rng: np.random.Generator, req: WeightRequest) -> np.ndarray:
    """A float32 array of req.shape drawn as req.initializer says (Glorot / He as in Keras; LeCun as
    NNTrainer defines it: normal with std sqrt(1/fan_in), uniform in +-sqrt(1/fan_in))."""
    shape, fan_in, fan_out = req.shape, max(req.fan_in, 1), max(req.fan_out, 1)
    match req.initializer:
        case "zeros":
            return np.zeros(shape, np.float32)
        case "ones":
            return np.ones(shape, np.float32)
        case "xavier_uniform":
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-limit, limit, shape).astype(np.float32)
        case "xavier_normal":
            return (rng.standard_normal(shape) * np.sqrt(2.0 / (fan_in + fan_out))).astype(np.float32)
        case "he_uniform":
            limit = np.sqrt(6.0 / fan_in)
            return rng.uniform(-limit, limit, shape).astype(np.float32)
        case "he_normal":
            return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        case "lecun_uniform":
            limit = np.sqrt(1.0 / fan_in)
            return rng.uniform(-limit, limit, shape).astype(np.float32)
        case "lecun_normal":
            return (rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)).astype(np.float32)
    raise ValueError(f"unknown initializer {req.initializer!r}")
