"""NNTrainer's vocabulary: every section and key NNTrainer's loader accepts is read into a field or
named in a note, schedules compute what NNTrainer's do, and what is really wrong names its line.
The model files here are written for these tests (NNTrainer's own files are its data, not ours);
they use the same vocabulary as NNTrainer's Applications/ and test models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedpers.nn.ini import parse_ini
from fedpers.nn.optim import per_weight_decay
from fedpers.nn.spec import LayerSpec

HEAD = "[in]\nType = input\nInput_Shape = 1:1:4\n"  # lines 1-3


def test_input_normalization_and_standardization_as_nntrainer_computes_them() -> None:
    from fedpers.nn.layers import LAYERS

    from tests.layer_harness import LayerRun

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 2, 3, 3)) * 5 + 3).astype(np.float32)
    x[2] = 7.0  # a constant example

    def run(**kw: bool) -> np.ndarray:
        lr = LayerRun.build(LAYERS["input"](LayerSpec("in", "input", input_shape=(2, 3, 3), **kw)), [(4, 2, 3, 3)],
                            dtype=np.float32)
        lr.run.feed.x, lr.run.feed.idx = x, None
        lr.layer.forward(lr.run, True)
        return lr.run.out.reshape(4, -1).astype(np.float64)

    flat = x.reshape(4, -1).astype(np.float64)
    norm = (flat - flat.min()) / (flat.max() - flat.min())  # over the whole batch
    np.testing.assert_allclose(run(normalization=True), norm, rtol=1e-5, atol=1e-6)
    centered = flat - flat.mean(axis=1, keepdims=True)
    scale = np.linalg.norm(centered, axis=1, keepdims=True) / flat.shape[1]  # ||x - mean|| / F
    expected = np.divide(centered, scale, out=np.zeros_like(centered), where=scale > 0)
    std = run(standardization=True)
    np.testing.assert_allclose(std, expected, rtol=1e-4, atol=1e-4)
    assert (std[2] == 0).all()  # a constant example becomes zeros, not NaN
    both = run(normalization=True, standardization=True)
    c2 = norm - norm.mean(axis=1, keepdims=True)
    s2 = np.linalg.norm(c2, axis=1, keepdims=True) / flat.shape[1]
    np.testing.assert_allclose(both, np.divide(c2, s2, out=np.zeros_like(c2), where=s2 > 0), rtol=1e-4, atol=1e-4)
    same = np.full((3, 1, 1, 4), 2.0, np.float32)
    lr = LayerRun.build(LAYERS["input"](LayerSpec("in", "input", input_shape=(1, 1, 4), normalization=True)),
                        [(3, 1, 1, 4)], dtype=np.float32)
    lr.run.feed.x, lr.run.feed.idx = same, None
    lr.layer.forward(lr.run, True)
    assert (lr.run.out == 0).all()  # max == min: zeros


def test_lecun_initializers_follow_nntrainer() -> None:
    from fedpers.nn import init_weights

    spec = parse_ini(HEAD.replace("1:1:4", "1:1:400") + "[fc]\nType = fully_connected\nUnit = 300\n"
                     "weight_initializer = lecun_uniform\n[g]\nType = fully_connected\nUnit = 300\n"
                     "weight_initializer = lecun_normal\n")
    w = init_weights(spec)
    assert np.abs(w["fc.weight"]).max() <= math.sqrt(1 / 400) + 1e-7
    assert np.abs(w["fc.weight"]).max() > 0.9 * math.sqrt(1 / 400)
    assert w["g.weight"].std() == pytest.approx(math.sqrt(1 / 300), rel=0.05)


# ---- layers NNTrainer realizes, backbones, data sets ----------------------------------------------


def test_weight_regularizer_and_decays_add_their_l2_term_to_the_right_weights() -> None:
    from fedpers.nn import Trainer

    base = ("[Model]\nloss = mse\n[Optimizer]\nType = sgd\nLearning_rate = 0.1\n" + HEAD
            + "[fc]\nType = fully_connected\nUnit = 2\n")
    plain = parse_ini(base)
    reg = parse_ini(base + "weight_regularizer = l2norm\nweight_regularizer_constant = 0.3\nbias_decay = 0.2\n")
    assert per_weight_decay(reg) == {"fc.weight": 0.3, "fc.bias": 0.2}
    assert per_weight_decay(parse_ini(base + "weight_regularizer = l2norm\n")) == {"fc.weight": 1.0}  # default 1
    assert per_weight_decay(parse_ini(base + "weight_regularizer = none\nweight_decay = 0.5\n")) == {"fc.weight": 0.5}
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 1, 1, 4)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    w0 = {"fc.weight": rng.standard_normal((4, 2)).astype(np.float32), "fc.bias": np.ones(2, np.float32)}
    after = {}
    for name, spec in (("plain", plain), ("reg", reg)):
        t = Trainer(spec)
        t.set_weights(w0)
        t.fit(x, y, epochs=1, batch_size=4, shuffle=False)
        after[name] = t.get_weights()
    # sgd: w1 = w0 - lr (g + c w0): the regularized step differs by exactly -lr c w0
    np.testing.assert_allclose(after["reg"]["fc.weight"] - after["plain"]["fc.weight"], -0.1 * 0.3 * w0["fc.weight"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(after["reg"]["fc.bias"] - after["plain"]["fc.bias"], -0.1 * 0.2 * w0["fc.bias"],
                               rtol=1e-5, atol=1e-7)
