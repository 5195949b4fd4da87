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

    module: str  # a module of this package, or an absolute module path (a layer added with add_kind)
    keys: frozenset[str]  # LayerSpec fields besides name, type and spec.COMMON_KEYS

    def module_path(self, package: str) -> str:
        return self.module if "." in self.module else f"{package}.{self.module}"


_WEIGHTED = frozenset({"weight_initializer", "bias_initializer", "weight_regularizer", "weight_regularizer_constant",
                       "weight_decay", "bias_decay", "activation"})  # fmt: skip

# Every kind takes `activation` (realized as its own node after the layer, as NNTrainer does).
KINDS: dict[str, LayerKind] = {
    "input": LayerKind("input", frozenset({"input_shape", "normalization", "standardization", "activation"})),
    "fully_connected": LayerKind("fully_connected", _WEIGHTED | {"unit"}),
    "conv2d": LayerKind("conv2d", _WEIGHTED | {"filters", "kernel_size", "stride", "padding"}),
    "pooling2d": LayerKind("pooling2d", frozenset({"pool_size", "stride", "padding", "pooling", "activation"})),
    "flatten": LayerKind("flatten", frozenset({"activation"})),
    "activation": LayerKind("activation", frozenset({"activation"})),
    "batch_normalization": LayerKind(
        "batch_normalization",
        frozenset({"epsilon", "momentum", "activation", "axis", "weight_decay", "bias_decay", "gamma_initializer",
                   "beta_initializer", "moving_mean_initializer", "moving_variance_initializer"}),
    ),
    "dropout": LayerKind("dropout", frozenset({"dropout_rate", "activation"})),
    "addition": LayerKind("addition", frozenset({"activation"})),
    "concat": LayerKind("concat", frozenset({"axis", "activation"})),
}

_FROM_BASE = frozenset({"LAYERS", "Feed", "InitContext", "Layer", "LayerState", "RunContext", "register"})

__all__ = [
    "KINDS", "LAYERS", "Feed", "InitContext", "Layer", "LayerKind", "LayerState", "RunContext", "add_kind",
    "import_all", "register",
]


def add_kind(name: str, keys: frozenset[str] | set[str] = frozenset(), module: str | None = None) -> None:
    """Make a new INI layer type known: the LayerSpec keys it accepts and the (absolute) module whose
    `@register` class implements it (default: the caller registers the class itself, right away).
    ValueError when the name is taken or a key is not a LayerSpec field."""
    from dataclasses import fields

    from ..spec import COMMON_KEYS, LayerSpec

    if name in KINDS:
        raise ValueError(f"layer kind {name!r} already exists")
    known = {f.name for f in fields(LayerSpec)} - {"name", "type"} - COMMON_KEYS
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"layer kind {name!r}: {unknown} are not LayerSpec keys (known: {sorted(known)})")
    KINDS[name] = LayerKind(module or "", frozenset(keys))  # "": the caller @registers its class itself


def import_all() -> list[str]:
    """Import every kind's module and, when numba is installed, every numba twin (compiling its kernels
    into numba's cache); returns the module names. For warming a cache ahead of time (an image
    build); models load only the kinds they use."""
    names = [importlib.import_module(kind.module_path(__name__)).__name__ for kind in KINDS.values() if kind.module]
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
