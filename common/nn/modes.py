"""The trainer's memory modes and kernel backends by name, one line of help each: what graph.compile
and Trainer accept, and what CLIs offer as --memory / --kernels choices. Light: importing it loads
no numpy and no numba."""

from __future__ import annotations

MEMORY_MODES: dict[str, str] = {
    "naive": "every tensor its own buffer, alive the whole iteration (the comparison baseline)",
    "planned": "one planned arena: views, in-place ops and best-fit offsets",
    "swap": "planned, plus saved activations swapped to a file between forward and backward",
    "swap-all": "swap, plus weights, gradient accumulators and optimizer state kept in the file outside the "
                "lookahead window",
}
DEFAULT_MEMORY_MODE = "planned"

KERNEL_BACKENDS: dict[str, str] = {
    "numpy": "plain numpy + BLAS: no compiler, nothing loaded beyond numpy (a device's default)",
    "numba": "numba-compiled kernels (cached): faster window and elementwise kernels, ~125 MiB more resident",
}
DEFAULT_KERNELS = "numpy"


def memory_modes_help(default: str | None = DEFAULT_MEMORY_MODE) -> str:
    """One line for a --memory help: 'naive: ...; planned: ... (default); swap: ...'."""
    return "; ".join(f"{name}: {text}{' (default)' if name == default else ''}" for name, text in MEMORY_MODES.items())


def kernel_backends_help(default: str | None = DEFAULT_KERNELS) -> str:
    """One line for a --kernels help."""
    return "; ".join(f"{name}: {text}{' (default)' if name == default else ''}"
                     for name, text in KERNEL_BACKENDS.items())
