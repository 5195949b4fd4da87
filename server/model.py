"""The model the server federates: which tensors it serves, which an update carries, which stay home.

Shared tensors (an update carries exactly these) are the trainable, non-personal weights. The
server also serves frozen non-personal weights, so a device can run the model, and never holds
any weight of a personal layer. Without a personalization method the personal layers are those the
model marks `personal = true` (plus `--personal-layers`); with one, the method's split decides
(`Method.split`: FedAvg and Ditto share every layer, FedPer and FedRep keep the head, FedBN the
batch-norm layers), and the marks only say where the head is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fedpers import personalization as pers
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
    local: tuple[str, ...] = ()  # tensors that stay on the devices: an update carrying one is refused
    method: str = ""  # the personalization method the split comes from ("": the INI's personal marks)

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
    ini_text: str, specs: Mapping[str, WeightInfo], personal_layers: Iterable[str] = (), local_stats: bool = False,
    *, local_layers: Iterable[str] | None = None, method: str = "",
) -> ModelLayout:
    """Split a model's weights into shared / frozen / personal.

    Personal layers are those the model marks `personal = true` plus `personal_layers`, or exactly
    `local_layers` when given (a method's split: the marks then mean nothing here). With
    `local_stats`, batch-norm running statistics stay on each device too (neither served nor sent;
    SiloBN, Andreux et al. 2020), while gamma and beta are still shared."""
    layers = {s.layer for s in specs.values()}
    extra = tuple(personal_layers)
    unknown = sorted(set(extra) - layers)
    if unknown:
        raise LayoutError(
            f"--personal-layers names {unknown}, which are not layers with weights; known: {sorted(layers)}")
    if local_layers is None:
        personal = set(extra) | {s.layer for s in specs.values() if s.personal}
    else:
        personal = set(local_layers)
    shapes = {n: tuple(int(d) for d in s.shape) for n, s in specs.items()
              if s.layer not in personal and not (local_stats and n.endswith(STAT_SUFFIXES))}
    shared = tuple(sorted(n for n, s in specs.items() if n in shapes and s.trainable))
    if not shared:
        raise LayoutError("the model has no shared trainable weights: nothing to federate")
    return ModelLayout(ini_text=ini_text, shapes=shapes, shared=shared, personal_layers=tuple(sorted(personal)),
                       local=tuple(sorted(set(specs) - set(shapes))), method=method)


def method_layout(ini_text: str, spec: Any, hp: pers.Hyperparams, personal_layers: Iterable[str] = (),
                  local_stats: bool = False) -> ModelLayout:
    """The layout of a personalization method's split. `personal_layers` adds to the layers the model
    marks personal, which is where FedPer and FedRep find the head (FedAvg and Ditto share them)."""
    from fedpers.nn import weight_specs

    specs = weight_specs(spec)
    extra = set(personal_layers)
    unknown = sorted(extra - {s.layer for s in specs.values()})
    if unknown:
        raise LayoutError(f"--personal-layers names {unknown}, which are not layers with weights")
    layers = [dataclasses.replace(ls, personal=True) if ls.name in extra else ls for ls in spec.layers]
    try:
        split = pers.get(hp.method).split(specs.values(), layers, hp)
    except pers.MethodError as exc:
        raise LayoutError(f"--personalization {hp.method}: {exc}") from None
    layout = layout_from_specs(ini_text, specs, local_stats=local_stats, local_layers=split.local_layers,
                               method=hp.method)
    assert set(layout.shared) <= set(split.shared) and not set(layout.shapes) & set(split.local)
    return layout


def load_model(path: str | os.PathLike, personal_layers: Iterable[str] = (), seed: int = 0,
               local_stats: bool = False, personalization: pers.Hyperparams | None = None,
               ) -> tuple[ModelLayout, dict[str, np.ndarray]]:
    """Read MODEL.ini -> (layout, served version-0 weights) with the trainer's own init; with a
    personalization method, its split decides what stays on the devices."""
    from fedpers.nn import init_weights, load_ini, weight_specs

    text = Path(path).read_text()
    spec: Any = load_ini(path)
    if personalization is not None:
        layout = method_layout(text, spec, personalization, personal_layers, local_stats)
    else:
        layout = layout_from_specs(text, weight_specs(spec), personal_layers, local_stats)
    return layout, layout.served(init_weights(spec, seed))
