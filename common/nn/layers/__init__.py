"""Layer kinds by INI type name.

KINDS is the one table of layer kinds: which LayerSpec keys each accepts (spec.LAYER_KEYS is read
from it) and which module of this package implements it. Importing this package is light (no
numpy, no numba): LAYERS[kind] imports a kind's module -- its numpy kernels -- the first time a
model uses that kind, and a layer finalized for the numba backend imports its numba twin in
fedpers.nn.jit then. The contract's names (Layer, RunContext, ...) load `base` on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import LAYERS, Feed, InitContext, Layer, LayerState, RunContext, register


@dataclass(frozen=True, slots=True)
class LayerKind:
    """One INI layer type: the module that registers its class, and the keys it accepts."""

    module: str  # a module of this package
    keys: frozenset[str]  # LayerSpec fields besides name, type and spec.COMMON_KEYS


KINDS: dict[str, LayerKind] = {
    "input": LayerKind("input", frozenset({"input_shape"})),
    "fully_connected": LayerKind(
        "fully_connected", frozenset({"unit", "activation", "weight_initializer", "bias_initializer"})
    ),
    "conv2d": LayerKind(
        "conv2d",
        frozenset(
            {"filters", "kernel_size", "stride", "padding", "activation", "weight_initializer", "bias_initializer"}
        ),
    ),
    "pooling2d": LayerKind("pooling2d", frozenset({"pool_size", "stride", "padding", "pooling"})),
    "flatten": LayerKind("flatten", frozenset()),
    "activation": LayerKind("activation", frozenset({"activation"})),
    "batch_normalization": LayerKind("batch_normalization", frozenset({"epsilon", "momentum", "activation"})),
    "dropout": LayerKind("dropout", frozenset({"dropout_rate"})),
    "addition": LayerKind("addition", frozenset({"activation"})),
}

_FROM_BASE = frozenset({"LAYERS", "Feed", "InitContext", "Layer", "LayerState", "RunContext", "register"})

__all__ = [
    "KINDS", "LAYERS", "Feed", "InitContext", "Layer", "LayerKind", "LayerState", "RunContext", "import_all",
    "register",
]


def import_all() -> list[str]:
    """Import every kind's module and, when numba is installed, every numba twin (compiling its kernels
    into numba's cache); returns the module names. For warming a cache ahead of time (an image
    build); models load only the kinds they use."""
    names = [importlib.import_module(f"{__name__}.{kind.module}").__name__ for kind in KINDS.values()]
    if importlib.util.find_spec("numba") is not None:
        jit = importlib.util.find_spec(__name__.rsplit(".", 1)[0] + ".jit")
        for info in pkgutil.iter_modules(jit.submodule_search_locations):
            names.append(importlib.import_module(f"{jit.name}.{info.name}").__name__)
    return names


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
