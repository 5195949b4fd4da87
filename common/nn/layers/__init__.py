"""Layer kinds by INI type name.

KINDS is the one table of layer kinds: which LayerSpec keys each accepts (spec.LAYER_KEYS is read
from it) and which module of this package implements it. Importing this package is light (no
numpy, no numba): LAYERS[kind] imports a kind's module -- compiling or loading its numba kernels --
the first time a model uses that kind. The contract's names (Layer, RunContext, ...) load
`base` on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import LAYERS, Feed, InitContext, Layer, LayerState, RunContext, register


@dataclass(frozen=True, slots=True)
class LayerKind:
    """One INI layer type: the module that registers its class, and the keys it accepts."""

    module: str  # a module of this package
    keys: frozenset[str]  # LayerSpec fields besides name, type and spec.COMMON_KEYS


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
    "KINDS", "LAYERS", "Feed", "InitContext", "Layer", "LayerKind", "LayerState", "RunContext", "import_all",
    "register",
]


def import_all() -> list[str]:
    """Import every kind's module (compiling its kernels into numba's cache); returns the module names.
    For warming a cache ahead of time (an image build); models load only the kinds they use."""
    return [importlib.import_module(f"{__name__}.{kind.module}").__name__ for kind in KINDS.values()]


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
