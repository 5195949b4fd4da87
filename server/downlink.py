"""Little bandwidth down: each published version is the previous one plus a compressed step.

When a round closes, the server optimizer's step (new - old, plus what earlier steps left out) is
encoded with the downlink codec; the version the server publishes and stores is `old + decode(step)`
in float32, the very sum a device computes. So a device that holds version v downloads only the
compressed steps v -> v' and rebuilds the server's weights bit for bit (it checks a SHA-256 of the
result), and what a lossy codec leaves out of one step is carried into the next (error feedback),
so the published model does not drift from the optimizer's. The encoded step and the carried rest
are stored with the version, so a restarted server continues exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from fedpers import codec as codecs
from fedpers import wire
from fedpers.modelsteps import add_step
from fedpers.store import MissingVersion, ModelStore

log = logging.getLogger(__name__)

STEP = "downlink/step"  # the version's encoded step (a TensorSet blob, as uint8) in the store's extras
RESIDUAL = "downlink/residual/"  # what the steps so far left out, per tensor


@dataclass
class Downlink:
    """The downlink codec (None: versions are the optimizer's exact output, downloads are full models),
    how many steps back a device may be and still get steps, and the carried rest of past steps."""

    codec: codecs.CodecSpec | None = None
    max_steps: int = 8
    residual: dict[str, np.ndarray] = field(default_factory=dict)

    def publish(self, version: int, old: Mapping[str, np.ndarray],
                new: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(the tensors to publish as `version`, the arrays to store with it)."""
        if self.codec is None:
            return dict(new), {}
        tensors, published, residual = [], {}, {}
        for name in sorted(new):
            base = np.asarray(old[name], np.float32)
            step = np.asarray(new[name], np.float32) - base
            if name in self.residual and self.residual[name].shape == step.shape:
                step = step + self.residual[name]
            spec = codecs.codec_for(name, self.codec)
            payload, _ = codecs.encode(spec, step, None, codecs.derive_seed("downlink", version, name))
            sent = codecs.decode(spec, payload, step.shape)
            published[name] = add_step(name, base, sent)  # exactly what a device computes
            residual[name] = step - sent
            tensors.append(wire.encoded_to_wire(name, step.shape, spec.name, payload))
        self.residual = residual
        extra = {STEP: np.frombuffer(wire.tensorset_to_blob(tensors), np.uint8).copy()}
        extra.update({RESIDUAL + k: v for k, v in residual.items()})
        return published, extra

    def load(self, extra: Mapping[str, np.ndarray]) -> None:
        """Carry on from a stored version (a restart)."""
        self.residual = {k[len(RESIDUAL):]: np.array(v, np.float32) for k, v in extra.items()
                         if k.startswith(RESIDUAL)}

    def steps_blob(self, store: ModelStore, have: int, version: int, weights_blob: bytes) -> bytes | None:
        """The ModelSteps blob from `have` to `version`, or None when steps cannot serve it (too far back,
        a version made without steps, or one the store no longer holds): the device then gets the weights."""
        if self.codec is None or not 0 <= have < version or version - have > self.max_steps:
            return None
        steps = []
        for v in range(have + 1, version + 1):
            try:
                extra = store.load_version(v).extra
            except MissingVersion:
                return None
            if STEP not in extra:
                return None
            steps.append(tuple(wire.tensorset_from_blob(extra[STEP].tobytes())))
        return wire.model_steps_to_blob(wire.ModelSteps(from_version=have, to_version=version, steps=tuple(steps),
                                                        weights_sha256=wire.sha256(weights_blob)))
