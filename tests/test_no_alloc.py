"""Layers never allocate: they only read and write the views a RunContext hands them.

Two checks. A source scan of common/nn/layers/*.py refuses array-making calls (np.empty, np.zeros,
.copy(), .astype(), ...) and numpy products or ufuncs called without out= in Python-level code;
a line may opt out with a `# alloc-ok: <reason>` comment (tiny fixed-size cases only). A runtime
check runs every layer kind, with both kernel backends, on realistic float32 tensors under
tracemalloc (numpy reports its buffers there) at two batch sizes: what a step allocates must not
grow with the batch, and stays within numpy's fixed ufunc buffers (a strided or casting ufunc
buffers up to 8192 elements per operand, whatever the size of the arrays).
"""

from __future__ import annotations

import ast
import tracemalloc
from pathlib import Path

import fedpers.nn.layers as layers_pkg
import numpy as np
import pytest
from fedpers.nn.layers import LAYERS
from fedpers.nn.layers.base import Layer
from fedpers.nn.layers.kernels import numba_available
from fedpers.nn.layers.loss import CrossEntropyLoss, MSELoss
from fedpers.nn.spec import LayerSpec

from tests.layer_harness import LayerRun

LAYER_DIR = Path(layers_pkg.__file__).parent
MAKERS = {
    "empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like", "array", "copy",
    "ascontiguousarray", "asfortranarray", "concatenate", "stack", "vstack", "hstack", "pad", "tile", "repeat",
    "outer", "kron", "where",
}  # fmt: skip
COPYING_METHODS = {"copy", "astype", "flatten", "tolist", "repeat"}
NEED_OUT = {
    "matmul", "dot", "add", "subtract", "multiply", "divide", "true_divide", "maximum", "minimum", "exp", "log",
    "sqrt", "tanh", "negative", "square", "sum", "mean", "var", "std", "max", "min", "clip", "abs",
}  # fmt: skip
ALLOC_OK = "# alloc-ok:"
BATCH_TENSOR_BYTES = 128 * 1024  # every activation in the runtime cases is at least this big
# What one step may allocate at peak: Python objects, views, and numpy's fixed ufunc buffers
# (8192 elements per buffered operand: a strided three-operand ufunc takes 96 KiB in float32).
STEP_BUDGET_BYTES = 128 * 1024
# Doubling the batch may add per-example or per-plane odds and ends (an index per example), never a
# batch-sized temporary: at most this fraction of the extra input bytes.
GROWTH_FRACTION = 1 / 32


def _is_np(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("np", "numpy")


def _is_kernel(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Name) and target.id == "njit":
            return True
    return False


def scan(path: Path) -> list[str]:
    """Allocation sites in one layer module, as 'file:line: reason'."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    kernel_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and _is_kernel(node):
            kernel_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        line = node.lineno
        if ALLOC_OK in lines[line - 1]:
            continue
        name = node.func.attr
        reason = None
        if _is_np(node.func.value) and name in MAKERS:
            reason = f"np.{name}() makes an array"
        elif not _is_np(node.func.value) and name in COPYING_METHODS:
            reason = f".{name}() copies"
        elif _is_np(node.func.value) and name in NEED_OUT and line not in kernel_lines:
            if not any(k.arg == "out" for k in node.keywords):
                reason = f"np.{name}() without out= allocates its result"
        elif _is_np(node.func.value) and name == "einsum" and line not in kernel_lines:
            spec = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else ""
            if not any(k.arg == "out" for k in node.keywords) and not str(spec).endswith("->"):
                reason = "np.einsum() to an array without out="
        if reason:
            found.append(f"{path.name}:{line}: {reason}")
    return found


LAYER_FILES = sorted(p for p in LAYER_DIR.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", LAYER_FILES, ids=[p.name for p in LAYER_FILES])
def test_layer_source_makes_no_arrays(path: Path) -> None:
    assert scan(path) == []


def test_scan_finds_allocations(tmp_path: Path) -> None:
    """The scanner itself: each kind of allocation is reported, opted-out and out= lines are not."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import numpy as np\n"
        "def f(x, y, out):\n"
        "    a = np.zeros(3)\n"
        "    b = x.copy()\n"
        "    c = np.matmul(x, y)\n"
        "    np.matmul(x, y, out=out)\n"
        "    d = np.empty(4)  # alloc-ok: test\n"
        "    e = x.astype(np.float64)\n"
        "    s = np.einsum('ij,ij->', x, y)\n"
    )
    assert [r.split(":")[1] for r in scan(bad)] == ["3", "4", "5", "8"]


# ---- runtime: what each step allocates ---------------------------------------------------------
def _spec(type_: str, **kw) -> Layer:
    return LAYERS[type_](LayerSpec("l", type_, **kw))


RUNTIME_CASES = {
    "fully_connected": (lambda: _spec("fully_connected", unit=1024), [(64, 2048)]),
    "conv2d_same": (lambda: _spec("conv2d", filters=16, kernel_size=(3, 3), padding="same"), [(8, 16, 32, 32)]),
    "conv2d_stride2": (lambda: _spec("conv2d", filters=32, kernel_size=(3, 3), stride=(2, 2)), [(8, 16, 34, 34)]),
    "conv2d_more_filters": (lambda: _spec("conv2d", filters=32, kernel_size=(3, 3)), [(8, 8, 34, 34)]),
    "conv2d_pointwise": (lambda: _spec("conv2d", filters=16, kernel_size=(1, 1)), [(8, 16, 32, 32)]),
    "pool_max": (lambda: _spec("pooling2d", pooling="max", pool_size=(2, 2)), [(8, 16, 32, 32)]),
    "pool_average": (lambda: _spec("pooling2d", pooling="average", pool_size=(2, 2)), [(8, 16, 32, 32)]),
    "pool_global_max": (lambda: _spec("pooling2d", pooling="global_max"), [(8, 256, 16, 16)]),
    "pool_global_average": (lambda: _spec("pooling2d", pooling="global_average"), [(8, 256, 16, 16)]),
    "batch_norm_4d": (lambda: _spec("batch_normalization"), [(8, 16, 32, 32)]),
    "batch_norm_2d": (lambda: _spec("batch_normalization"), [(64, 1024)]),
    "batch_norm_frozen": (lambda: _spec("batch_normalization", trainable=False), [(8, 16, 32, 32)]),
    "dropout": (lambda: _spec("dropout", dropout_rate=0.5), [(8, 16, 32, 32)]),
    "activation_relu": (lambda: _spec("activation", activation="relu"), [(8, 16, 32, 32)]),
    "activation_softmax": (lambda: _spec("activation", activation="softmax"), [(64, 1024)]),
    "activation_none": (lambda: _spec("activation", activation="none"), [(64, 1024)]),
    "flatten": (lambda: _spec("flatten"), [(8, 16, 32, 32)]),
    "addition": (lambda: _spec("addition"), [(8, 16, 32, 32)] * 3),
    "concat_channels": (lambda: _spec("concat", axis=1), [(8, 16, 32, 32), (8, 8, 32, 32)]),
    "concat_width": (lambda: _spec("concat", axis=3), [(8, 16, 32, 32), (8, 16, 32, 16)]),
    "batch_norm_width": (lambda: _spec("batch_normalization", axis=3), [(8, 16, 32, 32)]),
    "loss_cross": (lambda: CrossEntropyLoss(LayerSpec("loss", "flatten")), [(64, 1024)]),
    "loss_mse": (lambda: MSELoss(LayerSpec("loss", "flatten")), [(64, 1024)]),
}


def _steps(lr: LayerRun, training: bool = True) -> list:
    layer, run = lr.layer, lr.run
    steps = [lambda: layer.forward(run, training)]
    if training:
        if lr.trains:
            steps.append(lambda: layer.calc_gradient(run))
        steps.append(lambda: layer.calc_derivative(run))
    return steps


def _prepare(name: str, alias: bool, kernels: str = "numpy", scale: int = 1, accumulate: bool = False) -> LayerRun:
    make, shapes = RUNTIME_CASES[name]
    shapes = [(s[0] * scale, *s[1:]) for s in shapes]
    lr = LayerRun.build(make(), shapes, dtype=np.float32, alias=alias, strict=False, kernels=kernels,
                        accumulates=accumulate)
    lr.run.accumulate = accumulate
    rng = np.random.default_rng(0)
    for x in lr.run.inputs:
        x[...] = rng.standard_normal(x.shape)
    if lr.run.dout_ is not None:
        lr.run.dout_[...] = rng.standard_normal(lr.run.dout_.shape)
    if lr.layer.kind == "loss_cross":
        lr.run.feed.y, lr.run.feed.scale = rng.integers(0, shapes[0][1], shapes[0][0]), 1.0 / shapes[0][0]
    elif lr.layer.kind == "loss_mse":
        lr.run.feed.y, lr.run.feed.scale = rng.standard_normal(shapes[0]).astype(np.float32), 1.0 / shapes[0][0]
    return lr


def peak_allocation(step) -> int:
    """Peak bytes traced (numpy buffers included) while step() runs, above what was live before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        step()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_runtime_cases_cover_every_layer_kind() -> None:
    covered = {make().kind for make, _ in RUNTIME_CASES.values()}
    assert set(LAYERS) - {"input"} <= covered


def _step_peaks(lr: LayerRun) -> dict[tuple[bool, int], int]:
    for training in (True, False):
        for step in _steps(lr, training):
            step()  # warm up: numba dispatch caches, BLAS buffers, cached geometry tables
    return {(training, i): peak_allocation(step) for training in (True, False)
            for i, step in enumerate(_steps(lr, training))}


BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="no numba"))]


ACCUMULATING = ["fully_connected", "conv2d_same", "conv2d_stride2", "conv2d_pointwise", "batch_norm_4d"]
RUNS = [(n, a, False) for n in sorted(RUNTIME_CASES) for a in (False, True)] + [(n, False, True) for n in ACCUMULATING]


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize(("name", "alias", "accumulate"), RUNS, ids=[
    f"{n}-{'aliased' if a else 'separate'}{'-accumulating' if acc else ''}" for n, a, acc in RUNS])
def test_steps_allocate_nothing_batch_sized(name: str, alias: bool, accumulate: bool, kernels: str) -> None:
    lr = _prepare(name, alias, kernels, accumulate=accumulate)
    smallest = min(a.nbytes for a in lr.run.inputs)
    assert smallest >= BATCH_TENSOR_BYTES, "case too small to tell a batch-sized temporary from noise"
    peaks = _step_peaks(lr)
    doubled = _step_peaks(_prepare(name, alias, kernels, scale=2, accumulate=accumulate))
    extra_input = sum(a.nbytes for a in lr.run.inputs)
    for (training, i), peak in peaks.items():
        where = f"{name} step {i} (training={training}, {kernels})"
        assert peak < STEP_BUDGET_BYTES, f"{where} allocated {peak} bytes"
        grew = doubled[(training, i)] - peak
        assert grew <= extra_input * GROWTH_FRACTION, f"{where} allocated {grew} bytes more at twice the batch"


class _Doubler(Layer):
    """A layer with an implicit temporary: `x * 2.0` makes a batch-sized array before the copy."""

    kind = "doubler"

    def finalize(self, ctx):
        return ctx.input_shapes[0]

    def forward(self, run, training):
        run.output()[...] = run.input() * 2.0

    def calc_derivative(self, run):
        np.multiply(run.dout(), 2.0, out=run.din())


def test_runtime_check_catches_a_temporary() -> None:
    lr = LayerRun.build(_Doubler(LayerSpec("d", "flatten")), [(8, 16, 32, 32)], dtype=np.float32, strict=False)
    lr.layer.forward(lr.run, True)
    assert peak_allocation(lambda: lr.layer.forward(lr.run, True)) >= lr.run.out.nbytes
