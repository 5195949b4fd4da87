"""The model the server federates: which tensors it serves, which an update carries, which stay home.

Shared tensors (an update carries exactly these) are the trainable, non-personal weights. The
server also serves frozen non-personal weights, so a device can run the model, and never holds
any weight of a personal layer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fedpers.codec import STATISTICS_SUFFIXES


class WeightInfo(Protocol):
    """What the server needs to know of one weight (common.nn.WeightSpec satisfies it)."""

    name: str
    layer: str
    shape: tuple[int, ...]
    trainable: bool
    personal: bool


class LayoutError(ValueError):
    """The model and the server's settings disagree (unknown personal layer, no shared tensors...)."""


@dataclass(frozen=True)
class ModelLayout:
    ini_text: str
    shapes: dict[str, tuple[int, ...]]  # every served tensor: shared + frozen non-personal
    shared: tuple[str, ...]  # what an update carries, sorted
    personal_layers: tuple[str, ...]  # layers whose weights never reach the server

    @property
    def shared_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shapes[k] for k in self.shared}

    @property
    def shared_params(self) -> int:
        return sum(int(np.prod(self.shapes[k], dtype=np.int64)) for k in self.shared)

    def served(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Only the served tensors of `weights`, checked against the layout's names and shapes."""
        missing = sorted(set(self.shapes) - set(weights))
        if missing:
            raise LayoutError(f"weights lack served tensors {missing}")
        out = {}
        for k, shape in self.shapes.items():
            arr = np.asarray(weights[k], np.float32)
            if arr.shape != shape:
                raise LayoutError(f"weight {k!r} has shape {arr.shape}, the model says {shape}")
            out[k] = arr
        return out


STAT_SUFFIXES = STATISTICS_SUFFIXES  # batch-norm running statistics


def layout_from_specs(
    ini_text: str, specs: Mapping[str, WeightInfo], personal_layers: Iterable[str] = (), local_stats: bool = False
) -> ModelLayout:
    """Split a model's weights into shared / frozen / personal.

    Personal layers are those the model marks `personal = true` plus `personal_layers`. With
    `local_stats`, batch-norm running statistics stay on each device too (neither served nor sent;
    SiloBN, Andreux et al. 2020), while gamma and beta are still shared."""
    layers = {s.layer for s in specs.values()}
    extra = tuple(personal_layers)
    unknown = sorted(set(extra) - layers)
    if unknown:
        raise LayoutError(
            f"--personal-layers names {unknown}, which are not layers with weights; known: {sorted(layers)}")
    personal = set(extra) | {s.layer for s in specs.values() if s.personal}
    shapes = {n: tuple(int(d) for d in s.shape) for n, s in specs.items()
              if s.layer not in personal and not (local_stats and n.endswith(STAT_SUFFIXES))}
    shared = tuple(sorted(n for n, s in specs.items() if n in shapes and s.trainable))
    if not shared:
        raise LayoutError("the model has no shared trainable weights: nothing to federate")
    return ModelLayout(ini_text=ini_text, shapes=shapes, shared=shared, personal_layers=tuple(sorted(personal)))


def load_model(path: str | os.PathLike, personal_layers: Iterable[str] = (), seed: int = 0,
               local_stats: bool = False) -> tuple[ModelLayout, dict[str, np.ndarray]]:
    """Read MODEL.ini -> (layout, served version-0 weights) with the trainer's own init."""
    from fedpers.nn import init_weights, load_ini, weight_specs

    text = Path(path).read_text()
    spec: Any = load_ini(path)
    layout = layout_from_specs(text, weight_specs(spec), personal_layers, local_stats)
    return layout, layout.served(init_weights(spec, seed))
