"""Turn an update blob into a checked delta before anything touches the aggregate.

Checks, in order: the blob parses; no tensor that stays on the devices (the method's local tensors,
Ditto's `personal/` model: LocalTensor); exactly the expected tensor names; each shape; float32 dtype;
decodes with its codec; finite values; optionally the global L2 norm. Any failure is BadUpdate
with a message naming the tensor and the problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from fedpers import codec, wire
from fedpers.personalization import PERSONAL_PREFIX
from fedpers.server.aggregate import global_norm
from fedpers.server.errors import BadUpdate, LocalTensor


def decode_update(
    blob: bytes, expected: Mapping[str, tuple[int, ...]], norm_bound: float | None = None,
    local: Iterable[str] = (), method: str = "",
) -> dict[str, np.ndarray]:
    """Blob (serialized TensorSet) -> {name: float32 delta}, or BadUpdate / wire.WireError. `local`: the
    tensors that stay on the devices (named in the refusal as such)."""
    tensors = wire.tensorset_from_blob(blob)
    names = {t.name for t in tensors}
    leaked = sorted(n for n in names if n in set(local) or n.startswith(PERSONAL_PREFIX))
    if leaked:
        under = f" under {method}" if method else ""
        raise LocalTensor(f"tensor(s) {leaked[:8]} stay on the device{under}; the server never accepts them")
    unknown = sorted(names - set(expected))
    if unknown:
        raise BadUpdate(f"unknown tensor(s) {unknown}; an update carries exactly {sorted(expected)}")
    missing = sorted(set(expected) - names)
    if missing:
        raise BadUpdate(f"missing tensor(s) {missing}; an update carries exactly {sorted(expected)}")
    out: dict[str, np.ndarray] = {}
    for t in tensors:
        shape = tuple(expected[t.name])
        if t.shape != shape:
            raise BadUpdate(f"tensor {t.name!r} has shape {t.shape}, expected {shape}")
        if t.dtype != np.float32:
            raise BadUpdate(f"tensor {t.name!r} has dtype {t.dtype}, expected float32")
        if t.codec:
            try:
                arr = codec.decode(t.codec, t.data, shape)
            except codec.CodecError as exc:
                raise BadUpdate(f"tensor {t.name!r} ({t.codec}): {exc}") from None
        else:
            arr = t.to_array()
        if arr.dtype != np.float32 or arr.shape != shape:
            raise BadUpdate(f"tensor {t.name!r} decoded to {arr.dtype} {arr.shape}, expected float32 {shape}")
        if not np.isfinite(arr).all():
            raise BadUpdate(f"tensor {t.name!r} holds NaN or Inf values")
        out[t.name] = arr
    if norm_bound is not None:
        norm = global_norm(out)
        if norm > norm_bound:
            raise BadUpdate(f"update L2 norm {norm:.4g} exceeds the bound {norm_bound:.4g}")
    return out
