"""Layer kinds by INI type name: importing this package fills LAYERS."""

from . import activation, addition, flatten, fully_connected, input  # noqa: F401
from .base import LAYERS, InitContext, Layer, RunContext, register

__all__ = ["LAYERS", "InitContext", "Layer", "RunContext", "register"]
