"""Finite-difference gradient checks (float64) through the compiled graph: DAGs, frozen layers,
strided and padded convolutions, batch norm, both losses."""

import numpy as np
import pytest
from fedpers.nn import LayerSpec, ModelSpec, compile, init_weights
from fedpers.nn.layers.kernels import numba_available

from tests import nets


@pytest.fixture(params=["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    not numba_available(), reason="numba is not installed"))])
def kernels(request):
    """Each check runs on both kernel backends (numba's float64 variants compile on demand)."""
    if request.param == "numba":
        from fedpers.nn import jit

        jit.enable_float64()
    return request.param


def loss_and_grads(spec, weights, x, y, kernels="numpy"):
    c = compile(spec, len(x), mode="naive", dtype=np.float64, weights=weights, kernels=kernels)
    c.feed.x, c.feed.idx, c.feed.y, c.feed.scale = x, None, y, 1.0 / len(x)
    for ni, node in enumerate(c.nodes):
        node.layer.forward(c.contexts[ni]["forward"], True)
    grads = {}
    for ni in range(len(c.nodes) - 1, -1, -1):
        node, ctxs = c.nodes[ni], c.contexts[ni]
        if node.trains:
            node.layer.calc_gradient(ctxs["calc_grad"])
            for w, g in zip(node.ctx.weights, ctxs["calc_grad"].grads, strict=True):
                if g is not None:
                    grads[f"{node.spec_name}.{w.name}"] = g.copy()
        if node.backprop:
            node.layer.calc_derivative(ctxs["calc_deriv"])
    return c.feed.loss_sum / len(x), grads


def check(spec, x, y, samples=6, eps=1e-6, rtol=1e-4, kernels="numpy"):
    w = {k: v.astype(np.float64) for k, v in init_weights(spec, seed=1).items()}
    _, grads = loss_and_grads(spec, w, x, y, kernels)
    rng = np.random.default_rng(0)
    for name, g in grads.items():
        flat = w[name].reshape(-1)
        for i in rng.choice(flat.size, min(samples, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + eps
            lp, _ = loss_and_grads(spec, w, x, y, kernels)
            flat[i] = old - eps
            lm, _ = loss_and_grads(spec, w, x, y, kernels)
            flat[i] = old
            num = (lp - lm) / (2 * eps)
            ana = g.reshape(-1)[i]
            assert abs(num - ana) <= rtol * max(1.0, abs(num), abs(ana)) + 1e-7, (name, i, num, ana)
    return grads


def inputs(spec, n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.layers[0].input_shape))
    return x


def labels(n, classes, seed=1):
    return np.random.default_rng(seed).integers(0, classes, n).astype(np.int64)


def test_mlp_cross_entropy(kernels):
    spec = nets.mlp()
    grads = check(spec, inputs(spec), labels(6, 4), kernels=kernels)
    assert set(grads) == {f"{l}.{p}" for l in ("fc1", "fc2", "out") for p in ("weight", "bias")}


def test_mlp_mean_squared_error(kernels):
    spec = nets.mlp(loss="mse")
    y = np.random.default_rng(2).standard_normal((6, 4))
    check(spec, inputs(spec), y, kernels=kernels)


def test_frozen_middle_layer_passes_derivatives_but_has_no_gradient(kernels):
    spec = nets.mlp(frozen=("fc2",))
    grads = check(spec, inputs(spec), labels(6, 4), kernels=kernels)
    assert "fc2.weight" not in grads and "fc1.weight" in grads


def test_conv_stride_padding_batch_norm(kernels):
    spec = nets.cnn(batch_norm=True, stride=2)
    grads = check(spec, inputs(spec), labels(6, 3), kernels=kernels)
    assert {"c1.weight", "c2.weight", "bn1.gamma", "bn1.beta", "out.weight"} <= set(grads)
    assert "bn1.running_mean" not in grads


def test_residual_dag_with_addition(kernels):
    spec = nets.residual()
    grads = check(spec, inputs(spec), labels(6, 5), kernels=kernels)
    assert {"c1.weight", "c2.weight", "c3.weight"} <= set(grads)


def test_frozen_convs_under_a_trained_head(kernels):
    spec = nets.cnn(batch_norm=False, frozen=("c1", "c2"))
    grads = check(spec, inputs(spec), labels(6, 3), kernels=kernels)
    assert set(grads) == {"out.weight", "out.bias"}


@pytest.mark.parametrize("fn", ["sigmoid", "tanh", "relu", "none"])
def test_standalone_activation_layers(fn, kernels):
    spec = ModelSpec(layers=(
        LayerSpec("in", "input", input_shape=(1, 1, 5)),
        LayerSpec("fc", "fully_connected", unit=7),
        LayerSpec("act", "activation", activation=fn),
        LayerSpec("out", "fully_connected", unit=3, activation="softmax"),
    ))
    check(spec, inputs(spec), labels(6, 3), kernels=kernels)
