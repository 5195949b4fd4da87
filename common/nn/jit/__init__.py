"""The numba kernel backend: the layer, loss and optimizer kernels JIT-compiled with numba.

Each module here mirrors one numpy module (`fedpers.nn.layers.conv2d` <-> `fedpers.nn.jit.conv2d`,
`fedpers.nn.optim` <-> `fedpers.nn.jit.optim`) and defines the kernels that module lists in its
`KERNELS`, under the same names and arguments. Importing a module compiles its kernels -- or loads
them from numba's cache -- for float32 only; the float64 variants exist for the gradient checks and
compile only after `enable_float64()`. Every kernel is `@njit(cache=True, nogil=True)` with explicit
signatures, so a wrong dtype is an error, never a silent recompilation.

Importing numba and llvmlite costs about 125 MiB of resident memory before the first kernel
(`bench/footprint.py`), so a device runs the numpy backend unless asked for this one or its memory
budget leaves room for it (`fedpers.nn.budget`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from numba import njit

FLOAT = "float32"  # what training runs in
REDUCE = {"reassoc", "nsz"}  # lets LLVM vectorize sums (order of additions may change); nothing else

_float64 = False
_pending: list[tuple[Any, list[str]]] = []  # kernels whose float64 signatures are not compiled yet


def _compile(dispatcher: Any, signatures: Iterable[str]) -> None:
    dispatcher._can_compile = True
    try:
        for sig in signatures:
            dispatcher.compile(sig)
    finally:
        dispatcher.disable_compile()


def kernel(*templates: str, fastmath: set[str] | None = None) -> Callable[[Callable], Any]:
    """`@njit(cache=True, nogil=True)` with one explicit signature per template, `{t}` standing for
    the float type: float32 now, float64 once `enable_float64()` was called."""

    def decorate(fn: Callable) -> Any:
        opts: dict[str, Any] = {"cache": True, "nogil": True}
        if fastmath:
            opts["fastmath"] = fastmath
        dispatcher = njit([t.format(t=FLOAT) for t in templates], **opts)(fn)
        wide = [t.format(t="float64") for t in templates if "{t}" in t]
        if wide:
            if _float64:
                _compile(dispatcher, wide)
            else:
                _pending.append((dispatcher, wide))
        return dispatcher

    return decorate


def enable_float64() -> None:
    """Compile the float64 variants of every kernel imported so far, and of those imported later.
    Only the gradient checks need them; a device never calls this."""
    global _float64
    _float64 = True
    while _pending:
        dispatcher, sigs = _pending.pop()
        _compile(dispatcher, sigs)


def float64_enabled() -> bool:
    return _float64
