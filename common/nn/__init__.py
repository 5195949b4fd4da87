"""The on-device trainer: models from INI files or the Python API, memory-planned training.

Importing this package is light: each name below loads its module on first use, so reading an INI
file (`fedpers.nn.ini`, `fedpers.nn.spec`) loads neither the trainer nor numba, while
`from fedpers.nn import Trainer` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import rss
    from .budget import BudgetError, parse_size
    from .errors import DataError, WeightError
    from .graph import WeightSpec, compile, init_weights, output_size, weight_specs
    from .ini import load_ini, nntrainer_ini, parse_ini, save_ini, to_ini
    from .modes import DEFAULT_MEMORY_MODE, MEMORY_MODES, memory_modes_help
    from .spec import DatasetSpec, LayerSpec, ModelError, ModelSpec, OptimizerSpec, SchedulerSpec
    from .trainer import EvalResult, FitResult, MemoryReport, Trainer, warmup

# public name -> the module of this package that defines it ("rss" is the module itself)
_HOMES: dict[str, str] = {
    "rss": "rss",
    "BudgetError": "budget", "parse_size": "budget",
    "WeightSpec": "graph", "compile": "graph", "init_weights": "graph", "output_size": "graph",
    "weight_specs": "graph",
    "load_ini": "ini", "nntrainer_ini": "ini", "parse_ini": "ini", "save_ini": "ini", "to_ini": "ini",
    "DEFAULT_MEMORY_MODE": "modes", "MEMORY_MODES": "modes", "memory_modes_help": "modes",
    "LayerSpec": "spec", "ModelError": "spec", "ModelSpec": "spec", "OptimizerSpec": "spec", "SchedulerSpec": "spec",
    "DatasetSpec": "spec",
    "DataError": "errors", "WeightError": "errors",
    "EvalResult": "trainer", "FitResult": "trainer", "MemoryReport": "trainer", "Trainer": "trainer",
    "warmup": "trainer",
}  # fmt: skip

__all__ = [
    "DEFAULT_MEMORY_MODE", "MEMORY_MODES", "BudgetError", "DataError", "DatasetSpec", "EvalResult", "FitResult",
    "LayerSpec",
    "MemoryReport", "ModelError", "ModelSpec", "OptimizerSpec", "SchedulerSpec", "Trainer", "WeightError",
    "WeightSpec", "compile", "init_weights", "load_ini", "memory_modes_help", "nntrainer_ini", "output_size", "rss",
    "parse_ini",
    "parse_size", "save_ini", "to_ini", "warmup", "weight_specs",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use and keep the name here."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{home}")
    value = module if home == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
