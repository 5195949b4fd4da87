"""Weight initializers by name (the INI's weight_initializer / bias_initializer values)."""

from __future__ import annotations

import numpy as np

from .layers.base import WeightRequest

CHUNK = 1 << 16  # draws per pass: the float64 temporaries stay at 512 KiB whatever the weight's size


def initialize(rng: np.random.Generator, req: WeightRequest) -> np.ndarray:
    """A float32 array of req.shape drawn as req.initializer says (Glorot / He as in Keras; LeCun as
    NNTrainer defines it: normal with std sqrt(1/fan_in), uniform in +-sqrt(1/fan_in)).

    The draws are float64, a chunk at a time (the generator's stream continues from chunk to chunk, so
    the values are those of one big draw), each rounded into the float32 result."""
    shape, fan_in, fan_out = req.shape, max(req.fan_in, 1), max(req.fan_out, 1)
    out = np.empty(shape, np.float32)
    flat = out.reshape(-1)
    match req.initializer:
        case "zeros":
            out.fill(0.0)
            return out
        case "ones":
            out.fill(1.0)
            return out
        case "xavier_uniform" | "he_uniform":
            limit = np.sqrt(6.0 / ((fan_in + fan_out) if req.initializer == "xavier_uniform" else fan_in))
            draw = lambda n: rng.uniform(-limit, limit, n)  # noqa: E731
        case "xavier_normal" | "he_normal":
            std = np.sqrt(2.0 / ((fan_in + fan_out) if req.initializer == "xavier_normal" else fan_in))
            draw = lambda n: rng.standard_normal(n) * std  # noqa: E731
        case "lecun_uniform":
            limit = np.sqrt(1.0 / fan_in)
            draw = lambda n: rng.uniform(-limit, limit, n)  # noqa: E731
        case "lecun_normal":
            std = np.sqrt(1.0 / fan_in)
            draw = lambda n: rng.standard_normal(n) * std  # noqa: E731
        case _:
            raise ValueError(f"unknown initializer {req.initializer!r}")
    for a in range(0, flat.size, CHUNK):
        np.copyto(flat[a : a + CHUNK], draw(min(CHUNK, flat.size - a)), casting="same_kind")
    return out
