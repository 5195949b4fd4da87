"""NNTrainer's own files: its weight file (`NeuralNetwork::save`, MODEL_FORMAT_BIN) and its raw data files.

Weight file (.bin), as NNTrainer writes and reads it, all little-endian, no header:
1. every weight of every layer, raw float32 in NCHW order, layer by layer in NNTrainer's sorted
   graph order, and within a layer in the order it requests its weights (below);
2. only when the optimizer is adam: the 4 bytes b"adam", then for each layer in the same order and
   each of its weights that has a gradient (not a frozen layer, not batch-norm statistics) the two
   Adam moments m and v, raw float32 of the weight's shape;
3. the epoch and iteration counters, two uint32 (NNTrainer writes them when it saves in training
   mode; its reader tolerates their absence).
NNTrainer's sorted order is a reverse post-order depth-first walk of the layer graph: from each
layer not yet visited, in file order, visit its readers in file order, and list a layer after
everything it feeds (GraphCore::topologicalSort). In a chain that is file order; where a branch
joins later (a residual shortcut defined after the main path) the branch comes first.
Weight order within a layer: fully_connected and conv2d: weight, bias; batch_normalization:
moving_mean, moving_variance, gamma, beta. Shapes agree with fedpers's: fully_connected weight
(in, unit) = NNTrainer's 1:1:in:unit, conv2d weight (filters, C, kh, kw), biases and batch-norm
vectors flat.

Raw data file: examples back to back, each its inputs (the model's Input_Shape, NCHW) then its
label (the model's output size: one-hot classes for Loss = cross, targets for mse), all float32.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, WeightError
from .spec import ModelSpec

log = logging.getLogger(__name__)

# Weights of each layer kind in the order NNTrainer requests them (fedpers names).
NNTRAINER_WEIGHT_ORDER: dict[str, tuple[str, ...]] = {
    "fully_connected": ("weight", "bias"),
    "conv2d": ("weight", "bias"),
    "batch_normalization": ("running_mean", "running_var", "gamma", "beta"),
}
ADAM_MAGIC = b"adam"
FLOAT = np.dtype("<f4")
COUNTERS = np.dtype("<u4")


class FormatError(WeightError):
    """A model cannot be written in NNTrainer's layout, or a file does not hold this model's layout."""


@dataclass(frozen=True)
class BinEntry:
    """One weight of the .bin: its fedpers name, shape, byte offset and whether Adam state follows for it."""

    name: str
    shape: tuple[int, ...]
    offset: int
    has_gradient: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * FLOAT.itemsize


@dataclass
class BinContents:
    """What a .bin holds: weights by fedpers name, Adam moments (m, v) when present, the counters."""

    weights: dict[str, np.ndarray]
    adam: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    epoch: int | None = None
    iteration: int | None = None


def nntrainer_layer_order(spec: ModelSpec) -> list[str]:
    """Layer names in NNTrainer's sorted graph order (reverse post-order DFS, readers in file order)."""
    names = [ls.name for ls in spec.layers]
    readers: dict[str, list[str]] = {n: [] for n in names}
    for i, ls in enumerate(spec.layers):
        for src in spec.inputs_of(i):
            readers[src].append(ls.name)
    visited: set[str] = set()
    post: list[str] = []
    for root in names:
        if root in visited:
            continue
        visited.add(root)
        stack = [(root, iter(readers[root]))]
        while stack:  # iterative DFS (deep nets would overflow Python's recursion)
            node, it = stack[-1]
            nxt = next((r for r in it if r not in visited), None)
            if nxt is None:
                post.append(node)
                stack.pop()
            else:
                visited.add(nxt)
                stack.append((nxt, iter(readers[nxt])))
    return post[::-1]


def bin_layout(spec: ModelSpec) -> list[BinEntry]:
    """Every weight of the model in .bin order, with offsets; FormatError for what NNTrainer lays out
    differently (a fully_connected fed a C:H:W tensor: NNTrainer's works on the width only)."""
    from .graph import compile as compile_graph  # the layers' requests give shapes and gradients

    c = compile_graph(spec, 1, training=False, allocate=False)
    by_layer: dict[str, dict[str, tuple[tuple[int, ...], bool]]] = {}
    for node in c.nodes:
        ls = next((x for x in spec.layers if x.name == node.spec_name), None)
        if ls is None or not node.ctx.weights:
            continue
        if ls.type == "fully_connected":
            in_shape = node.ctx.input_shapes[0][1:]
            if len(in_shape) == 3 and in_shape[0] * in_shape[1] > 1:
                raise FormatError(f"[{ls.name}] takes a {':'.join(map(str, in_shape))} input; NNTrainer's "
                                  "fully_connected works on the width only: put a flatten layer before it")
        by_layer[ls.name] = {w.name: (tuple(w.shape), w.trainable and ls.trainable) for w in node.ctx.weights}
    entries, offset = [], 0
    for name in nntrainer_layer_order(spec):
        if name not in by_layer:
            continue
        kind = spec.layer(name).type
        order = NNTRAINER_WEIGHT_ORDER.get(kind)
        if order is None or set(order) != set(by_layer[name]):
            raise FormatError(f"[{name}]: no NNTrainer weight layout known for a {kind} layer")
        for w in order:
            shape, grad = by_layer[name][w]
            e = BinEntry(f"{name}.{w}", shape, offset, grad)
            entries.append(e)
            offset += e.nbytes
    return entries


def encode_bin(spec: ModelSpec, weights: dict[str, np.ndarray], *,
               adam: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, epoch: int = 0,
               iteration: int = 0) -> bytes:
    """The .bin bytes for `weights` (fedpers names). With an adam optimizer the Adam block follows
    (`adam` moments by weight name, zeros where absent: a fresh optimizer), then the counters."""
    layout = bin_layout(spec)
    parts: list[bytes] = []
    for e in layout:
        if e.name not in weights:
            raise FormatError(f"no value for weight {e.name}")
        arr = np.asarray(weights[e.name])
        if tuple(arr.shape) != e.shape:
            raise FormatError(f"weight {e.name} has shape {tuple(arr.shape)}, the model says {e.shape}")
        parts.append(np.ascontiguousarray(arr, dtype=FLOAT).tobytes())
    if spec.optimizer.type == "adam":
        parts.append(ADAM_MAGIC)
        for e in layout:
            if not e.has_gradient:
                continue
            m, v = (adam or {}).get(e.name, (None, None))
            for moment in (m, v):
                arr = np.zeros(e.shape, FLOAT) if moment is None else np.asarray(moment, FLOAT).reshape(e.shape)
                parts.append(arr.tobytes())
    parts.append(np.array([epoch, iteration], COUNTERS).tobytes())
    return b"".join(parts)


def save_bin(path: str | os.PathLike, spec: ModelSpec, weights: dict[str, np.ndarray], **kw) -> None:
    """Write the .bin atomically (temp file, fsync, rename); keywords as `encode_bin`."""
    from ..store import atomic_write_bytes

    atomic_write_bytes(path, encode_bin(spec, weights, **kw))


def decode_bin(spec: ModelSpec, data: bytes, source: str = "<bytes>") -> BinContents:
    """Read a .bin laid out for `spec` (weights only, or with the Adam block and/or counters)."""
    layout = bin_layout(spec)
    need = sum(e.nbytes for e in layout)
    if len(data) < need:
        raise FormatError(f"{source}: {len(data)} bytes, but the model's weights alone take {need}")
    out = BinContents({e.name: np.frombuffer(data, FLOAT, math.prod(e.shape), e.offset).reshape(e.shape).copy()
                       for e in layout})
    rest = memoryview(data)[need:]
    if rest[:4].tobytes() == ADAM_MAGIC:
        rest = rest[4:]
        out.adam = {}
        for e in layout:
            if not e.has_gradient:
                continue
            if len(rest) < 2 * e.nbytes:
                raise FormatError(f"{source}: the Adam block ends inside {e.name}")
            m = np.frombuffer(rest, FLOAT, math.prod(e.shape), 0).reshape(e.shape).copy()
            v = np.frombuffer(rest, FLOAT, math.prod(e.shape), e.nbytes).reshape(e.shape).copy()
            out.adam[e.name] = (m, v)
            rest = rest[2 * e.nbytes :]
    if len(rest) == COUNTERS.itemsize * 2:
        out.epoch, out.iteration = (int(x) for x in np.frombuffer(rest, COUNTERS))
    elif len(rest):
        raise FormatError(f"{source}: {len(rest)} bytes left after the weights: not this model's layout")
    return out


def load_bin(path: str | os.PathLike, spec: ModelSpec) -> BinContents:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FormatError(f"{p}: {e.strerror or e}") from None
    return decode_bin(spec, data, str(p))


# ---------------------------------------------------------------- raw data files


def example_sizes(spec: ModelSpec) -> tuple[int, int]:
    """(input values, label values) of one example in NNTrainer's raw data files for this model."""
    from .graph import output_size

    return math.prod(spec.layers[0].input_shape), output_size(spec)


def resolve_data_path(path: str, model_file: str | os.PathLike | None) -> Path:
    """A [DataSet] / [train_set] path as NNTrainer resolves it: relative to the model file's folder."""
    p = Path(path)
    if p.is_absolute() or model_file is None:
        return p
    return Path(model_file).resolve().parent / p


def read_raw_data(path: str | os.PathLike, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an NNTrainer raw data file: x float32 (N, C, H, W); y int64 class labels for
    Loss = cross (the one-hot rows' argmax) or float32 targets (N, outputs) for mse."""
    p = Path(path)
    n_in, n_out = example_sizes(spec)
    per = (n_in + n_out) * FLOAT.itemsize
    try:
        size = p.stat().st_size
    except OSError as e:
        raise DataError(f"{p}: {e.strerror or e}") from None
    if size == 0 or size % per:
        raise DataError(f"{p}: {size} bytes is not a whole number of examples of {per} bytes ({n_in} input and "
                        f"{n_out} label float32 values, from the model's Input_Shape and output size)")
    raw = np.fromfile(p, FLOAT).reshape(-1, n_in + n_out)
    x = np.ascontiguousarray(raw[:, :n_in], dtype=np.float32).reshape(len(raw), *spec.layers[0].input_shape)
    labels = raw[:, n_in:]
    if not (np.isfinite(x).all() and np.isfinite(labels).all()):
        raise DataError(f"{p}: holds NaN or Inf values")
    if spec.loss != "cross":
        return x, np.ascontiguousarray(labels, dtype=np.float32)
    hot = labels == 1.0
    if not (hot.sum(axis=1) == 1).all() or not ((labels == 0.0) | hot).all():
        bad = int(np.argmax((hot.sum(axis=1) != 1) | ~((labels == 0.0) | hot).all(axis=1)))
        raise DataError(f"{p}: example {bad}'s label is not one-hot over {n_out} classes (Loss = cross needs "
                        "one-hot labels)")
    return x, np.argmax(labels, axis=1).astype(np.int64)


def encode_raw_data(x: np.ndarray, labels: np.ndarray) -> bytes:
    """Raw data bytes: each row of x (flattened) followed by its label row (one-hot or targets)."""
    x2 = np.asarray(x, FLOAT).reshape(len(x), -1)
    y2 = np.asarray(labels, FLOAT).reshape(len(labels), -1)
    if len(x2) != len(y2):
        raise DataError(f"{len(x2)} examples but {len(y2)} labels")
    return np.concatenate([x2, y2], axis=1).tobytes()


def one_hot(y: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[np.asarray(y, dtype=np.int64)]
