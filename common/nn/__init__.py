"""The on-device trainer: models from INI files or the Python API, memory-planned training."""

from . import rss
from .budget import BudgetError, parse_size
from .graph import WeightSpec, compile, init_weights, output_size, weight_specs
from .ini import load_ini, parse_ini, save_ini, to_ini
from .spec import LayerSpec, ModelError, ModelSpec, OptimizerSpec, SchedulerSpec
from .trainer import DataError, EvalResult, FitResult, MemoryReport, Trainer, WeightError, warmup

__all__ = [
    "BudgetError", "DataError", "EvalResult", "FitResult", "LayerSpec", "MemoryReport", "ModelError",
    "ModelSpec", "OptimizerSpec", "SchedulerSpec", "Trainer", "WeightError", "WeightSpec", "compile",
    "init_weights", "load_ini", "output_size", "rss", "parse_ini", "parse_size", "save_ini", "to_ini", "warmup",
    "weight_specs",
]
