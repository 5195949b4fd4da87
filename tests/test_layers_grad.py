"""Finite-difference gradient checks in float64 for every layer kind, one layer at a time.

Each case builds one layer with tests/layer_harness.py (which also poisons every buffer outside its
declared lifespan, so these checks double as lifespan checks) and compares dL/dinputs and
dL/dweights with central differences for L = sum(out * R), or the scaled loss for loss layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from common.nn.layers import LAYERS
from common.nn.layers.base import InitContext, Layer, RunContext
from common.nn.layers.loss import CrossEntropyLoss, MSELoss
from common.nn.order import Life
from common.nn.spec import LayerSpec
from tests.layer_harness import LayerRun, LifeViolation, check_gradients

TOL = 1e-6  # relative (to max(1, |grad|)); float64 central differences land near 1e-9


def away_from_zero(rng: np.random.Generator, shape: tuple[int, ...], margin: float = 0.05) -> np.ndarray:
    """Normal draws pushed at least `margin` from 0 (relu's kink), so eps-steps never cross it."""
    x = rng.standard_normal(shape)
    return np.where(x >= 0, x + margin, x - margin)


def distinct(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A permutation of well-separated values: every max is unique by a margin far above eps."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) * 0.1 - n * 0.05).astype(np.float64)


@dataclass
class Case:
    name: str
    make: Callable[[], Layer]
    shapes: list[tuple[int, ...]]
    inputs: Callable[[np.random.Generator], list[np.ndarray]] | None = None
    kwargs: dict = field(default_factory=dict)  # for LayerRun.build
    setup: Callable[[LayerRun], None] | None = None
    objective: Callable | None = None
    before_forward: Callable[[LayerRun], None] | None = None
    training: bool = True


def spec_layer(name: str, type_: str, **kw) -> Callable[[], Layer]:
    return lambda: LAYERS[type_](LayerSpec(name, type_, **kw))


def normal_inputs(shapes):
    return lambda rng: [rng.standard_normal(s) for s in shapes]


def conv(name: str, x: tuple[int, ...], **kw) -> Case:
    return Case(name, spec_layer("conv", "conv2d", filters=kw.pop("filters", 3), **kw), [x])


def pool(mode: str, x: tuple[int, ...], **kw) -> Case:
    data = (lambda rng: [distinct(rng, x)]) if "max" in mode else None
    return Case(f"pool_{mode}_{kw}", spec_layer("pool", "pooling2d", pooling=mode, **kw), [x], data)


def act(fn: str) -> Case:
    shape = (3, 5)
    return Case(
        f"activation_{fn}",
        spec_layer("act", "activation", activation=fn),
        [shape],
        lambda rng: [away_from_zero(rng, shape)],
    )


def set_running_stats(lr: LayerRun) -> None:
    """Non-trivial running statistics for a frozen batch norm (it normalizes with them)."""
    lr.weight("running_mean")[...] = [0.3, -0.2]
    lr.weight("running_var")[...] = [1.5, 0.7]


def fixed_rng(lr: LayerRun) -> None:
    """Same dropout mask on every forward: reseed the layer's generator."""
    lr.run.state["rng"] = np.random.default_rng(1234)


def cross_entropy_case() -> Case:
    labels = np.array([0, 3, 1, 3], dtype=np.int64)

    def setup(lr: LayerRun) -> None:
        lr.run.state["batch_y"] = labels
        lr.run.state["scale"] = 1.0 / len(labels)

    return Case(
        "loss_cross",
        lambda: CrossEntropyLoss(LayerSpec("loss", "flatten")),
        [(4, 5)],
        setup=setup,
        objective=lambda lr, out: lr.run.state["loss_sum"] * lr.run.state["scale"],
    )


def mse_case() -> Case:
    target = np.random.default_rng(9).standard_normal((4, 3))

    def setup(lr: LayerRun) -> None:
        lr.run.state["batch_y"] = target
        lr.run.state["scale"] = 1.0 / 4

    return Case(
        "loss_mse",
        lambda: MSELoss(LayerSpec("loss", "flatten")),
        [(4, 3)],
        setup=setup,
        objective=lambda lr, out: lr.run.state["loss_sum"] * lr.run.state["scale"],
    )


CASES = [
    Case("fully_connected", spec_layer("fc", "fully_connected", unit=4), [(3, 5)]),
    Case("fully_connected_4d_in", spec_layer("fc", "fully_connected", unit=3), [(2, 2, 3, 2)]),
    conv("conv_stride2_pad1", (2, 3, 7, 6), kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),
    conv("conv_same_nonsquare", (2, 3, 7, 6), kernel_size=(3, 2), padding="same"),
    conv("conv_same_stride2", (2, 2, 7, 5), kernel_size=(3, 3), stride=(2, 2), padding="same"),
    conv("conv_valid_stride12", (2, 3, 7, 6), kernel_size=(3, 3), stride=(1, 2), padding="valid"),
    conv("conv_valid_5x3_stride32", (1, 2, 9, 7), kernel_size=(5, 3), stride=(3, 2)),
    conv("conv_pointwise", (2, 4, 3, 3), kernel_size=(1, 1), filters=5),
    conv("conv_pointwise_stride2", (2, 4, 5, 5), kernel_size=(1, 1), stride=(2, 2)),
    conv("conv_big_pad", (1, 2, 4, 4), kernel_size=(3, 3), padding=(3, 2)),
    conv("conv_big_pad_fewer_filters", (1, 3, 4, 4), kernel_size=(3, 3), padding=(3, 2), filters=2),
    conv("conv_more_filters", (2, 2, 5, 5), kernel_size=(3, 3), padding="same", filters=6),
    pool("max", (2, 3, 6, 5), pool_size=(2, 2)),
    pool("max", (2, 2, 7, 7), pool_size=(3, 3), stride=(2, 2), padding="same"),
    pool("max", (1, 2, 5, 6), pool_size=(3, 2), stride=(1, 1), padding=(1, 1)),
    pool("average", (2, 3, 6, 5), pool_size=(2, 2)),
    pool("average", (2, 2, 7, 7), pool_size=(3, 3), stride=(2, 2), padding="same"),
    pool("average", (1, 2, 5, 6), pool_size=(3, 2), stride=(1, 1), padding=(1, 1)),
    pool("global_max", (2, 3, 4, 5)),
    pool("global_average", (2, 3, 4, 5)),
    Case("batch_norm_2d", spec_layer("bn", "batch_normalization"), [(6, 4)]),
    Case("batch_norm_4d", spec_layer("bn", "batch_normalization", epsilon=1e-2), [(3, 2, 3, 4)]),
    Case(
        "batch_norm_4d_frozen",
        spec_layer("bn", "batch_normalization", trainable=False),
        [(3, 2, 3, 4)],
        setup=set_running_stats,
    ),
    Case("dropout", spec_layer("drop", "dropout", dropout_rate=0.4), [(4, 6)], before_forward=fixed_rng),
    Case("dropout_4d", spec_layer("drop", "dropout", dropout_rate=0.25), [(2, 3, 2, 2)], before_forward=fixed_rng),
    Case("dropout_eval", spec_layer("drop", "dropout", dropout_rate=0.4), [(4, 6)], training=False),
    *[act(fn) for fn in ("relu", "sigmoid", "tanh", "softmax", "none")],
    Case("flatten", spec_layer("flat", "flatten"), [(2, 3, 2, 2)]),
    Case("addition_3", spec_layer("add", "addition"), [(2, 3, 2), (2, 3, 2), (2, 3, 2)]),
    cross_entropy_case(),
    mse_case(),
]


def _can_alias(case: Case) -> bool:
    """Whether the layer declares its output in place or a view (the graph then shares buffers)."""
    return LayerRun.build(case.make(), case.shapes, alias=True, **case.kwargs).alias


RUNS = [(c, False) for c in CASES] + [(c, True) for c in CASES if _can_alias(c)]


@pytest.mark.parametrize(("case", "alias"), RUNS, ids=[c.name + ("-aliased" if a else "") for c, a in RUNS])
def test_gradients_match_finite_differences(case: Case, alias: bool) -> None:
    layer = case.make()
    lr = LayerRun.build(layer, case.shapes, alias=alias, **case.kwargs)
    assert lr.alias == alias
    lr.randomize_weights()
    if case.setup:
        case.setup(lr)
    rng = np.random.default_rng(0)
    xs = case.inputs(rng) if case.inputs else [rng.standard_normal(s) for s in case.shapes]
    result = check_gradients(
        lr, xs, objective=case.objective, before_forward=case.before_forward, training=case.training
    )
    assert result.errors, "nothing was checked"
    name, err = result.worst()
    assert err < TOL, f"{case.name}: d/d{name} off by {err:.2e} ({result.errors})"


def test_every_layer_kind_has_a_gradient_case() -> None:
    """Adding a layer kind without a gradient check fails here (input has no gradient to check)."""
    covered = {c.make().kind for c in CASES}
    assert set(LAYERS) - {"input"} <= covered, sorted(set(LAYERS) - covered)


def test_frozen_layers_get_no_gradient_and_skip_calc_gradient() -> None:
    """A frozen conv has grads None; calc_gradient is a no-op and calc_derivative still works."""
    layer = LAYERS["conv2d"](LayerSpec("c", "conv2d", filters=2, kernel_size=(3, 3), trainable=False))
    lr = LayerRun.build(layer, [(2, 2, 5, 5)])
    assert lr.run.grads == [None, None]
    lr.forward(np.random.default_rng(0).standard_normal((2, 2, 5, 5)))
    dins, grads = lr.backward(np.ones(lr.out_shape))
    assert grads == [None, None] and np.isfinite(dins[0]).all()


def test_no_upstream_derivative_is_skipped() -> None:
    """din None (nothing upstream trains): the layer writes nothing and does not fail."""
    for case in CASES:
        layer = case.make()
        lr = LayerRun.build(layer, case.shapes, need_din=False)
        lr.randomize_weights()
        if case.setup:
            case.setup(lr)
        rng = np.random.default_rng(0)
        xs = case.inputs(rng) if case.inputs else [rng.standard_normal(s) for s in case.shapes]
        lr.forward(*xs)
        dins, grads = lr.backward(None if lr.run.dout_ is None else np.ones(lr.out_shape))
        assert all(d is None for d in dins)
        assert all(g is None or np.isfinite(g).all() for g in grads), case.name


class _ReadsInputLate(Layer):
    """A deliberately wrong layer: y = 2x, but its derivative reads x without declaring input_life."""

    kind = "bad"

    def finalize(self, ctx: InitContext):
        return ctx.input_shapes[0]

    def forward(self, run: RunContext, training: bool) -> None:
        np.multiply(run.input(), 2.0, out=run.output())

    def calc_derivative(self, run: RunContext) -> None:
        np.multiply(run.dout(), run.input() * 0 + 2.0, out=run.din())


class _WritesScratchLate(_ReadsInputLate):
    """Another wrong layer: its forward-only scratch is written during the derivative."""

    def finalize(self, ctx: InitContext):
        self.s = ctx.request_tensor("s", ctx.input_shapes[0], Life.FORWARD)
        return ctx.input_shapes[0]

    def calc_derivative(self, run: RunContext) -> None:
        run.tensor(self.s)[...] = 0.0
        np.multiply(run.dout(), 2.0, out=run.din())


@pytest.mark.parametrize("bad", [_ReadsInputLate, _WritesScratchLate])
def test_harness_catches_lifespan_violations(bad: type[Layer]) -> None:
    lr = LayerRun.build(bad(LayerSpec("bad", "flatten")), [(2, 3)])
    lr.forward(np.ones((2, 3)))
    with pytest.raises(LifeViolation):
        lr.backward(np.ones((2, 3)))
