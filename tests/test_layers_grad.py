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
from fedpers.nn.layers import LAYERS
from fedpers.nn.layers.base import InitContext, Layer, RunContext
from fedpers.nn.layers.kernels import numba_available
from fedpers.nn.layers.loss import CrossEntropyLoss, MSELoss
from fedpers.nn.order import Life
from fedpers.nn.spec import LayerSpec, ModelError

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
    lr.run.state.rng = np.random.default_rng(1234)


def cross_entropy_case() -> Case:
    labels = np.array([0, 3, 1, 3], dtype=np.int64)

    def setup(lr: LayerRun) -> None:
        lr.run.feed.y = labels
        lr.run.feed.scale = 1.0 / len(labels)

    return Case(
        "loss_cross",
        lambda: CrossEntropyLoss(LayerSpec("loss", "flatten")),
        [(4, 5)],
        setup=setup,
        objective=lambda lr, out: lr.run.feed.loss_sum * lr.run.feed.scale,
    )


def mse_case() -> Case:
    target = np.random.default_rng(9).standard_normal((4, 3))

    def setup(lr: LayerRun) -> None:
        lr.run.feed.y = target
        lr.run.feed.scale = 1.0 / 4

    return Case(
        "loss_mse",
        lambda: MSELoss(LayerSpec("loss", "flatten")),
        [(4, 3)],
        setup=setup,
        objective=lambda lr, out: lr.run.feed.loss_sum * lr.run.feed.scale,
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
    Case("activation_relu_output_kept", spec_layer("act", "activation", activation="relu"), [(3, 5)],
         lambda rng: [away_from_zero(rng, (3, 5))], kwargs={"output_kept": True}),
    Case("flatten", spec_layer("flat", "flatten"), [(2, 3, 2, 2)]),
    Case("addition_3", spec_layer("add", "addition"), [(2, 3, 2), (2, 3, 2), (2, 3, 2)]),
    Case("concat_channels", spec_layer("cat", "concat", axis=1), [(2, 3, 2, 4), (2, 1, 2, 4)]),
    Case("concat_height_3", spec_layer("cat", "concat", axis=2), [(2, 2, 3, 2), (2, 2, 1, 2), (2, 2, 2, 2)]),
    Case("concat_width_default", spec_layer("cat", "concat"), [(2, 3, 2, 4), (2, 3, 2, 1)]),
    Case("concat_features_2d", spec_layer("cat", "concat", axis=3), [(3, 4), (3, 2)]),
    Case("concat_2d_default_channel", spec_layer("cat", "concat"), [(3, 4), (3, 4)]),
    Case("batch_norm_axis_width", spec_layer("bn", "batch_normalization", axis=3), [(3, 2, 2, 4)]),
    Case("batch_norm_axis_height", spec_layer("bn", "batch_normalization", axis=2), [(3, 2, 3, 2)]),
    Case("batch_norm_one_channel", spec_layer("bn", "batch_normalization"), [(4, 1, 2, 3)]),
    cross_entropy_case(),
    mse_case(),
]


def _can_alias(case: Case) -> bool:
    """Whether the layer declares its output in place or a view (the graph then shares buffers)."""
    return LayerRun.build(case.make(), case.shapes, alias=True, **case.kwargs).alias


RUNS = [(c, False) for c in CASES] + [(c, True) for c in CASES if _can_alias(c)]
BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="no numba"))]


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize(("case", "alias"), RUNS, ids=[c.name + ("-aliased" if a else "") for c, a in RUNS])
def test_gradients_match_finite_differences(case: Case, alias: bool, kernels: str) -> None:
    layer = case.make()
    lr = LayerRun.build(layer, case.shapes, alias=alias, kernels=kernels, **case.kwargs)
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


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c.name.startswith(("fully_connected", "conv", "batch_norm_"))
                                  and not c.name.endswith("frozen")], ids=lambda c: c.name)
def test_accumulating_calc_gradient_adds_exactly_its_gradient(case: Case, kernels: str) -> None:
    """Micro-batching: a layer asked to accumulate adds this batch's gradient to what the buffers
    hold (the accumulators), through its own small scratch."""
    lr = LayerRun.build(case.make(), case.shapes, kernels=kernels, accumulates=True, **case.kwargs)
    lr.randomize_weights()
    rng = np.random.default_rng(0)
    xs = case.inputs(rng) if case.inputs else [rng.standard_normal(s) for s in case.shapes]
    dout = rng.standard_normal(lr.out_shape)
    lr.forward(*xs)
    _, fresh = lr.backward(dout)
    prior = [None if g is None else rng.standard_normal(g.shape) for g in fresh]
    for buf, p in zip(lr.run.grads, prior, strict=True):
        if buf is not None:
            buf[...] = p
    lr.forward(*xs)
    _, summed = lr.backward(dout, accumulate=True)
    checked = 0
    for f, p, s in zip(fresh, prior, summed, strict=True):
        if f is not None:
            np.testing.assert_allclose(s, p + f, rtol=1e-10, atol=1e-10)
            checked += 1
    assert checked >= 2


def test_every_layer_kind_has_a_gradient_case() -> None:
    """Adding a layer kind without a gradient check fails here (input has no gradient to check)."""
    covered = {c.make().kind for c in CASES}
    assert set(LAYERS) - {"input"} <= covered, sorted(set(LAYERS) - covered)


def test_each_kind_module_registers_exactly_its_kind() -> None:
    """LAYERS[kind] imports the module KINDS names, which registers that kind and no other."""
    from fedpers.nn.layers import KINDS, base, import_all

    import_all()
    assert set(base._CLASSES) == set(KINDS)
    for kind, entry in KINDS.items():
        cls = LAYERS[kind]
        assert cls.kind == kind and cls.__module__ == f"fedpers.nn.layers.{entry.module}"


def test_register_refuses_a_kind_missing_from_the_table() -> None:
    from fedpers.nn.layers import register

    with pytest.raises(TypeError, match="'bogus' is not in"):
        register(type("Bogus", (Layer,), {"kind": "bogus"}))
    with pytest.raises(KeyError):
        LAYERS["bogus"]


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


# ---- layer semantics beyond gradients ------------------------------------------------------------
def test_batch_norm_running_stats_follow_momentum_in_training_only() -> None:
    lr = LayerRun.build(LAYERS["batch_normalization"](LayerSpec("bn", "batch_normalization")), [(4, 2, 3, 3)])
    x = np.random.default_rng(0).standard_normal((4, 2, 3, 3)) * 3 + 1
    lr.forward(x, training=True)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(lr.weight("running_mean"), 0.01 * mean, rtol=1e-12)
    np.testing.assert_allclose(lr.weight("running_var"), 0.99 + 0.01 * var, rtol=1e-12)
    before = lr.weight("running_mean").copy()
    out = lr.forward(x, training=False)  # evaluation: running statistics, no update
    np.testing.assert_array_equal(lr.weight("running_mean"), before)
    rm, rv = lr.weight("running_mean"), lr.weight("running_var")
    expected = (x - rm[None, :, None, None]) / np.sqrt(rv[None, :, None, None] + 1e-3)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_batch_norm_axis_and_initializers() -> None:
    """Statistics per index of the chosen NCHW axis (NNTrainer's `axis`; width by default for one
    channel); the four initializers fill the weights."""
    spec = LayerSpec("bn", "batch_normalization", axis=3, momentum=0.5, gamma_initializer="zeros",
                     beta_initializer="ones", moving_mean_initializer="zeros", moving_variance_initializer="ones")
    lr = LayerRun.build(LAYERS["batch_normalization"](spec), [(5, 2, 3, 4)])
    assert lr.weight("gamma").shape == (4,)
    assert (lr.weight("gamma") == 0).all() and (lr.weight("beta") == 1).all()
    x = np.random.default_rng(0).standard_normal((5, 2, 3, 4)) * 2 + 1
    lr.forward(x, training=True)
    np.testing.assert_allclose(lr.weight("running_mean"), 0.5 * x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(lr.weight("running_var"), 0.5 + 0.5 * x.var(axis=(0, 1, 2)), rtol=1e-12)
    one = LayerRun.build(LAYERS["batch_normalization"](LayerSpec("b", "batch_normalization")), [(2, 1, 3, 5)])
    assert one.weight("gamma").shape == (5,)


def test_frozen_batch_norm_uses_running_stats_and_keeps_them() -> None:
    layer = LAYERS["batch_normalization"](LayerSpec("bn", "batch_normalization", trainable=False, epsilon=0.01))
    lr = LayerRun.build(layer, [(5, 3)])
    assert lr.ctx.scratch == [] and lr.run.grads == [None] * 4  # saves nothing, no gradients
    lr.weight("running_mean")[...] = [1.0, 2.0, 3.0]
    lr.weight("running_var")[...] = [4.0, 1.0, 0.25]
    x = np.random.default_rng(0).standard_normal((5, 3))
    out = lr.forward(x, training=True)
    np.testing.assert_allclose(out, (x - [1.0, 2.0, 3.0]) / np.sqrt(np.array([4.0, 1.0, 0.25]) + 0.01))
    np.testing.assert_array_equal(lr.weight("running_mean"), [1.0, 2.0, 3.0])


def test_dropout_scales_kept_units_and_is_identity_in_eval() -> None:
    lr = LayerRun.build(LAYERS["dropout"](LayerSpec("d", "dropout", dropout_rate=0.25)), [(50, 40)])
    x = np.random.default_rng(0).random((50, 40)) + 1.0
    out = lr.forward(x, training=True)
    kept = out != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(out[kept], x[kept] / 0.75)
    again = lr.forward(x, training=True)
    assert (again != 0).mean() > 0.7 and not np.array_equal(kept, again != 0)  # a fresh mask per step
    np.testing.assert_array_equal(lr.forward(x, training=False), x)
    dins, _ = lr.backward(np.ones((50, 40)))
    np.testing.assert_array_equal(dins[0], np.ones((50, 40)))  # after an eval forward: identity


def test_dropout_masks_repeat_for_the_same_generator_seed() -> None:
    def masks(seed: int) -> np.ndarray:
        lr = LayerRun.build(LAYERS["dropout"](LayerSpec("d", "dropout", dropout_rate=0.5)), [(8, 8)])
        lr.run.state.rng = np.random.default_rng(seed)
        return np.stack([lr.forward(np.ones((8, 8))) != 0 for _ in range(3)])

    np.testing.assert_array_equal(masks(5), masks(5))
    assert not np.array_equal(masks(5), masks(6))


@pytest.mark.parametrize(
    ("kw", "in_shape", "out_shape"),
    [
        ({"kernel_size": (3, 3), "padding": "same"}, (2, 3, 7, 6), (2, 4, 7, 6)),
        ({"kernel_size": (3, 3), "padding": "same", "stride": (2, 2)}, (2, 3, 7, 6), (2, 4, 4, 3)),
        ({"kernel_size": (3, 3)}, (2, 3, 7, 6), (2, 4, 5, 4)),
        ({"kernel_size": (5, 3), "padding": (2, 1), "stride": (2, 1)}, (1, 1, 9, 9), (1, 4, 5, 9)),
    ],
)
def test_conv_output_shapes(kw: dict, in_shape: tuple, out_shape: tuple) -> None:
    lr = LayerRun.build(LAYERS["conv2d"](LayerSpec("c", "conv2d", filters=4, **kw)), [in_shape])
    assert lr.out_shape == out_shape
    assert lr.weight("weight").shape == (4, in_shape[1], *kw["kernel_size"]) and lr.weight("bias").shape == (4,)


def test_pooling_stride_defaults_to_pool_size_and_global_gives_1x1() -> None:
    pool = LayerRun.build(
        LAYERS["pooling2d"](LayerSpec("p", "pooling2d", pooling="max", pool_size=(2, 3))), [(1, 2, 8, 9)]
    )
    assert pool.out_shape == (1, 2, 4, 3)
    glob = LayerRun.build(LAYERS["pooling2d"](LayerSpec("p", "pooling2d", pooling="global_average")), [(3, 5, 4, 4)])
    assert glob.out_shape == (3, 5, 1, 1)


@pytest.mark.parametrize(
    ("type_", "kw", "shape", "key"),
    [
        ("conv2d", {"kernel_size": (3, 3)}, (1, 1, 5, 5), "filters"),
        ("conv2d", {"filters": 2}, (1, 1, 5, 5), "kernel_size"),
        ("conv2d", {"filters": 2, "kernel_size": (7, 7)}, (1, 1, 5, 5), "kernel_size"),
        ("conv2d", {"filters": 2, "kernel_size": (3, 3)}, (1, 25), "input_layers"),
        ("pooling2d", {"pool_size": (2, 2)}, (1, 1, 4, 4), "pooling"),
        ("pooling2d", {"pooling": "max"}, (1, 1, 4, 4), "pool_size"),
        ("pooling2d", {"pooling": "max", "pool_size": (2, 2), "padding": (2, 2)}, (1, 1, 4, 4), "padding"),
        ("batch_normalization", {}, (1, 2, 3), "input_layers"),
    ],
)
def test_bad_layer_settings_name_the_key(type_: str, kw: dict, shape: tuple, key: str) -> None:
    with pytest.raises(ModelError) as err:
        LAYERS[type_](LayerSpec("bad", type_, **kw)).finalize(InitContext("bad", [shape], shape[0]))
    assert err.value.key == key and err.value.section == "bad"
