"""numba twin of fedpers.nn.layers.kernels: the bias add of fully_connected and conv2d."""

from __future__ import annotations

from . import kernel

KERNELS = ("add_bias",)


@kernel("void({t}[:,:,::1], {t}[::1])")
def add_bias(out, b):
    """out (T, F, P) += b[None, :, None]."""
    tile, f_out, p = out.shape
    for t in range(tile):
        for f in range(f_out):
            v = b[f]
            for j in range(p):
                out[t, f, j] += v
