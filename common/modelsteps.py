"""A device's side of the downlink: rebuild a model version from the version it holds and the compressed
steps since (server/downlink.py makes them), in exactly the float32 order the server used."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from fedpers import codec as codecs
from fedpers import wire


def add_step(name: str, held: np.ndarray, sent: np.ndarray) -> np.ndarray:
    """One tensor of the next version: held + decoded step in float32; a running variance is kept >= 0
    (a float32 sum can land a hair below 0). The server publishes with this, devices rebuild with it."""
    out = np.asarray(held, np.float32) + np.asarray(sent, np.float32)
    return np.maximum(out, np.float32(0)) if name.endswith(".running_var") else out


def apply_steps(held: Mapping[str, np.ndarray], steps: wire.ModelSteps) -> dict[str, np.ndarray]:
    """The weights of `steps.to_version` from those of `steps.from_version`; MalformedMessage when a step
    names a tensor the held weights lack or has another shape."""
    out = {k: np.asarray(v, np.float32) for k, v in held.items()}
    for step in steps.steps:
        for t in step:
            if t.name not in out or tuple(out[t.name].shape) != t.shape:
                raise wire.MalformedMessage(f"a step changes {t.name!r} {t.shape}, which the held model lacks")
            out[t.name] = add_step(t.name, out[t.name], codecs.decode(t.codec, t.data, t.shape))
    return out


def rebuilt_matches(weights: Mapping[str, np.ndarray], steps: wire.ModelSteps) -> bool:
    """Whether rebuilt weights are the server's model bit for bit (the SHA-256 of its TensorSet blob)."""
    return wire.sha256(wire.arrays_to_blob(weights)) == steps.weights_sha256
