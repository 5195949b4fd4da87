"""What the layer kernels share: the float types they are compiled for, the fastmath flags that let
sums vectorize, explicit-signature templates, and the bias add of fully_connected and conv2d."""

from __future__ import annotations

from numba import njit

DTYPES = ("float32", "float64")  # float32 is what runs; float64 serves the gradient checks
REDUCE = {"reassoc", "nsz"}  # lets LLVM vectorize sums (order of additions may change); nothing else


def signatures(template: str) -> list[str]:
    """One explicit signature per dtype from a template with `{t}` for the float type."""
    return [template.format(t=t) for t in DTYPES]


@njit(signatures("void({t}[:,:,::1], {t}[::1])"), cache=True, nogil=True)
def add_bias(out, b):
    """out (T, F, P) += b[None, :, None]."""
    tile, f_out, p = out.shape
    for t in range(tile):
        for f in range(f_out):
            v = b[f]
            for j in range(p):
                out[t, f, j] += v
