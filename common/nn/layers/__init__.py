"""Layer kinds by INI type name: importing this package fills LAYERS."""

from . import (  # noqa: F401
    activation,
    addition,
    batch_normalization,
    conv2d,
    dropout,
    flatten,
    fully_connected,
    input,
    pooling2d,
)
from .base import LAYERS, InitContext, Layer, RunContext, register

__all__ = ["LAYERS", "InitContext", "Layer", "RunContext", "register"]
