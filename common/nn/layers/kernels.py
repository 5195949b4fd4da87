"""Kernel backends of the layer modules, and the bias add shared by fully_connected and conv2d.

Every module with kernels (each layer kind, the loss, the optimizer) defines them in plain numpy --
ufuncs with out=, BLAS through np.matmul, loops only over window offsets or chunks, never over
elements -- and lists their names in KERNELS. `fedpers.nn.jit.<module>` defines the same names as
numba kernels. A layer picks its namespace while finalizing: `for_backend(__name__, ctx.kernels)`.
Where a numpy kernel needs scratch that its numba twin does not, it takes it as keyword arguments
and the layer requests those tensors only for the numpy backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import numpy as np

from ..modes import KERNEL_BACKENDS

KERNELS = ("add_bias",)
_JIT_PACKAGE = __name__.rsplit(".", 2)[0] + ".jit"  # fedpers.nn.jit


class BackendUnavailable(ImportError):
    """kernels='numba' was asked for, but numba cannot be imported here."""


class _Twin:
    """A numba twin module, imported on its first kernel call: planning a model for the numba
    backend (a memory budget weighing it) loads neither numba nor llvmlite."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ModuleNotFoundError as e:
                if e.name in ("numba", "llvmlite"):
                    raise BackendUnavailable("kernels='numba' needs numba, which is not installed here: "
                                             "use the numpy kernels") from e
                raise
        return getattr(self._module, attr)


def for_backend(module: str, backend: str) -> ModuleType:
    """The kernel namespace of `module` (a fedpers.nn module name) for a backend: the module itself
    for numpy, its twin in fedpers.nn.jit for numba (imported when first used)."""
    if backend == "numpy":
        return sys.modules[module]
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {tuple(KERNEL_BACKENDS)}, got {backend!r}")
    return _Twin(f"{_JIT_PACKAGE}.{module.rsplit('.', 1)[1]}")  # type: ignore[return-value]


def numba_available() -> bool:
    """Whether numba can be imported (without importing it)."""
    return importlib.util.find_spec("numba") is not None


def add_bias(out: np.ndarray, b: np.ndarray) -> None:
    """out (T, F, P) += b[None, :, None]."""
    np.add(out, b[None, :, None], out=out)
