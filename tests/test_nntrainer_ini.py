"""NNTrainer's vocabulary: every section and key NNTrainer's loader accepts is read into a field or
named in a note, schedules compute what NNTrainer's do, and what is really wrong names its line.
The model files here are written for these tests (NNTrainer's own files are its data, not ours);
they use the same vocabulary as NNTrainer's Applications/ and test models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fedpers.nn.ini import IniError, load_ini, nntrainer_ini, parse_ini, to_ini
from fedpers.nn.optim import learning_rate, per_weight_decay
from fedpers.nn.spec import DatasetSpec, LayerSpec, ModelSpec, OptimizerSpec, SchedulerSpec

HEAD = "[in]\nType = input\nInput_Shape = 1:1:4\n"  # lines 1-3
TAIL = "[out]\nType = fully_connected\nUnit = 3\nActivation = softmax\n"

# Everything at once, in NNTrainer's spelling: legacy-free sections, data sets, a loss layer.
VOCABULARY = """\
[Model]
Type = NeuralNetwork
Epochs = 3
batch_size = 8
continue_train = true
tensor_format = nchw
model_tensor_type = FP16-FP16
save_best_path = "best.bin"
memory_optimization = true

[Optimizer]
Type = adam
beta1 = 0.8
torch_ref = false

[LearningRateScheduler]
type = exponential
learning_rate = 0.01
decay_rate = 0.5
decay_steps = 20

[train_set]
type = file
path = "train.dat"
buffer_size = 100

[valid_set]
Type = File
path = valid.dat

[image]
Type = input
Input_Shape = 2:3:4
Normalization = true
Standardization = true

[conv]
Type = conv2d
filters = 4
kernel_size = 3,3
padding = same
dilation = 1,1
disable_bias = false
weight_regularizer = l2norm
weight_regularizer_constant = 0.005
weight_decay = 0.001
bias_decay = 0.002
weight_initializer = lecun_normal
print = true

[bn]
Type = batch_normalization
epsilon = 1.0e-6
momentum = 0.9
axis = 1
Activation = relu
beta_initializer = zeros
gamma_initializer = ones
moving_mean_initializer = zeros
moving_variance_initializer = ones
weight_decay = 0.1

[side]
Type = conv2d
input_layers = image(0)
filters = 2
kernel_size = 1,1
compute_engine = cpu
print = false

[cat]
Type = concat
input_layers = bn, side
axis = 1

[flat]
Type = flatten
start_dimension = 1
end_dimension = 3

[drop]
Type = dropout
dropout_rate = 0.25

[fc]
Type = fully_connected
Unit = 5
weight_regularizer = l2norm
weight_regularizer_constant = 0.01

[loss]
Type = mse
input_layers = fc
"""


def test_the_vocabulary_file_reads_into_typed_fields() -> None:
    spec = parse_ini(VOCABULARY)
    assert (spec.epochs, spec.batch_size, spec.loss) == (3, 8, "mse")  # the loss layer sets the loss
    assert spec.continue_train and spec.tensor_format == "NCHW" and spec.model_tensor_type == "FP16-FP16"
    assert spec.optimizer == OptimizerSpec("adam", learning_rate=0.01, beta1=0.8)  # lr from the schedule
    assert spec.scheduler == SchedulerSpec("exponential", decay_rate=0.5, decay_steps=20)
    assert spec.dataset == DatasetSpec(train="train.dat", valid="valid.dat")
    assert [ls.name for ls in spec.layers] == ["image", "conv", "bn", "side", "cat", "flat", "drop", "fc"]
    image, conv, bn = spec.layer("image"), spec.layer("conv"), spec.layer("bn")
    assert image.normalization and image.standardization
    assert (conv.weight_regularizer, conv.weight_regularizer_constant) == ("l2norm", 0.005)
    assert (conv.weight_decay, conv.bias_decay, conv.weight_initializer) == (0.001, 0.002, "lecun_normal")
    assert (bn.epsilon, bn.momentum, bn.axis, bn.activation) == (1e-6, 0.9, 1, "relu")
    assert (bn.gamma_initializer, bn.beta_initializer) == ("ones", "zeros")
    assert (bn.moving_mean_initializer, bn.moving_variance_initializer) == ("zeros", "ones")
    assert spec.layer("side").input_layers == ("image",) and spec.layer("cat").axis == 1
    assert spec.layer("cat").input_layers == ("bn", "side")


def test_keys_without_meaning_here_are_named_once_in_notes() -> None:
    notes = parse_ini(VOCABULARY).notes
    text = "\n".join(notes)
    for key in ("save_best_path", "memory_optimization", "torch_ref", "buffer_size", "compute_engine",
                "continue_train", "model_tensor_type"):
        assert sum(n.startswith(key + " ") for n in notes) == 1, (key, notes)
    print_notes = [n for n in notes if n.startswith("print ")]
    assert len(print_notes) == 1 and "[conv], [side]" in print_notes[0]  # one note, every section named
    assert "FP16-FP16" in text and "float32" in text
    assert not any(n.startswith(("dilation", "disable_bias", "start_dimension")) for n in notes)  # defaults: silent


def test_vocabulary_round_trips_through_to_ini_and_plans() -> None:
    from fedpers.nn import graph

    spec = parse_ini(VOCABULARY)
    text = to_ini(spec)
    assert parse_ini(text) == spec and to_ini(parse_ini(text)) == text
    for key in ("continue_train = true", "model_tensor_type = FP16-FP16", "[train_set]", 'path = "valid.dat"',
                "normalization = true", "weight_regularizer = l2norm", "moving_variance_initializer = ones",
                "axis = 1", "decay_steps = 20"):
        assert key in text, key
    c = graph.compile(spec, 4, allocate=False)
    assert c.nodes[-1].out_shape == (4, 5)


def test_legacy_optimizer_keys_in_model_section() -> None:
    text = ("[Model]\nLearning_rate = 0.0001\nDecay_rate = 0.96\nDecay_steps = 1000\nOptimizer = adam\n"
            "beta1 = 0.9\nbeta2 = 0.9999\nepsilon = 1e-7\nloss = cross\n" + HEAD + TAIL)
    spec = parse_ini(text)
    assert spec.optimizer == OptimizerSpec("adam", learning_rate=1e-4, beta1=0.9, beta2=0.9999, epsilon=1e-7)
    assert spec.scheduler == SchedulerSpec("exponential", decay_rate=0.96, decay_steps=1000)
    assert parse_ini(to_ini(spec)) == spec


def test_legacy_keys_without_model_optimizer_are_ignored_as_nntrainer_does() -> None:
    spec = parse_ini("[Model]\nLearning_rate = 0.5\n[Optimizer]\nType = sgd\n" + HEAD + TAIL)
    assert spec.optimizer == OptimizerSpec("sgd", learning_rate=1e-4)  # NNTrainer's sgd default
    assert any(n.startswith("learning_rate ([Model])") and "ignored" in n for n in spec.notes)
    assert parse_ini("[Optimizer]\nType = adam\n" + HEAD).optimizer.learning_rate == 1e-3
    no_type = parse_ini("[Optimizer]\nLearning_rate = 0.1\n" + HEAD)
    assert no_type.optimizer.type == "adam" and any("NNTrainer's default" in n for n in no_type.notes)


@pytest.mark.parametrize(
    ("text", "section", "key", "words", "line"),
    [
        ("[Model]\nOptimizer = sgd\n[Optimizer]\nType = adam\n" + HEAD, "Model", "optimizer", "given twice", 2),
        ("[Model]\nOptimizer = sgd\nbeta1 = 0.9\n" + HEAD, "Model", "beta1", "unknown key", 3),
        ("[Optimizer]\nType = sgd\ndecay_rate = 0.9\n[LearningRateScheduler]\nType = constant\n" + HEAD,
         "Optimizer", "decay_rate", "given twice", 3),
        ("[Optimizer]\nType = sgd\ndecay_rate = 0.9\n" + HEAD, "Optimizer", "decay_steps", "decay_steps", 1),
        ("[LearningRateScheduler]\nType = cosine\nmax_learning_rate = 0.1\nmin_learning_rate = 0.2\n"
         "decay_steps = 3\n" + HEAD, "LearningRateScheduler", "min_learning_rate", "<= max", 4),
        ("[LearningRateScheduler]\nType = linear\nmax_learning_rate = 0.1\n" + HEAD, "LearningRateScheduler",
         "decay_steps", "decay_steps", 1),
        ("[LearningRateScheduler]\nType = step\nlearning_rate = 0.1, 0.2, 0.3\niteration = 5, 5\n" + HEAD,
         "LearningRateScheduler", "iteration", "increasing", 4),
        ("[LearningRateScheduler]\nType = constant\nlearning_rate = 0.1, 0.2\n" + HEAD, "LearningRateScheduler",
         "learning_rate", "one learning_rate", 3),
        ("[Model]\ntensor_format = NWHC\n" + HEAD, "Model", "tensor_format", "unknown value", 2),
        ("[Model]\nmodel_tensor_type = FP8-FP8\n" + HEAD, "Model", "model_tensor_type", "unknown value", 2),
        ("[Model]\ncontinue_train = sometimes\n" + HEAD, "Model", "continue_train", "true or false", 2),
        ("[DataSet]\nTrainData = a.dat\nColour = red\n" + HEAD, "DataSet", "colour", "unknown key", 3),
        ("[test_set]\ntype = file\n" + HEAD, "test_set", "path", "needs path", 1),
        (HEAD + "[fc]\nType = fully_connected\nUnit = 2\ndisable_bias = true\n", "fc", "disable_bias",
         "always have a bias", 7),
        (HEAD + "[c]\nType = conv2d\nfilters = 2\nkernel_size = 1\ndilation = 2,2\n", "c", "dilation",
         "no dilation", 8),
        (HEAD + "[fc]\nType = fully_connected\nUnit = 2\nlora_rank = 4\n", "fc", "lora_rank", "LoRA", 7),
        (HEAD + "[f]\nType = flatten\nstart_dimension = 2\n", "f", "start_dimension", "every axis", 6),
        (HEAD + "[fc]\nType = fully_connected\nUnit = 2\n[l]\nType = cross_sigmoid\n", "l", "type",
         "cross_sigmoid loss is not implemented", 8),
        (HEAD + "[l]\nType = mse\n[fc]\nType = fully_connected\nUnit = 2\n", "l", "type", "must be the last", 5),
        (HEAD + "[a]\nType = fully_connected\nUnit = 2\n[b]\nType = fully_connected\nUnit = 2\n"
         "[l]\nType = mse\ninput_layers = a\n", "l", "input_layers", "layer before it", 12),
        (HEAD + "[bn]\nType = batch_normalization\naxis = 0\n", "bn", "axis", "1 (channel)", 6),
        (HEAD + "[bn]\nType = batch_normalization\ngamma_initializer = zero\n", "bn", "gamma_initializer",
         "unknown value", 6),
        (HEAD + "[fc]\nType = fully_connected\nUnit = 2\nweight_regularizer = l1\n", "fc",
         "weight_regularizer", "unknown value", 7),
        (HEAD + "[fc]\nType = fully_connected\nUnit = 2\nbias_decay = -1\n", "fc", "bias_decay", "negative", 7),
        (HEAD + "[x]\nType = flatten\ninput_layers = in(1)\n", "x", "input_layers", "index (0)", 6),
        (HEAD + "[x]\nType = concat\nnormalization = true\n", "x", "normalization", "not a key of a concat", 6),
        (HEAD + "[bb]\nbackbone = mobilenet.tflite\n", "bb", "backbone", "only .ini backbones", 5),
        (HEAD + "[bb]\nbackbone = nowhere.ini\n", "bb", "backbone", "cannot read", 5),
        ("[]\nType = input\nInput_Shape = 1:1:1\n", "", None, "empty section name", 1),
        (HEAD + "[x]\nType = output\n", "x", "type", "no longer registers", 5),
        ("[x]\nType = fully_connected\nUnit = 2\n", "x", "type", "or give Input_Shape", 2),
    ],
)
def test_what_is_really_wrong_names_section_key_and_line(text: str, section: str, key: str | None, words: str,
                                                          line: int) -> None:
    with pytest.raises(IniError) as info:
        parse_ini(text)
    err = info.value
    assert (err.section, err.key, err.line) == (section, key, line), str(err)
    assert words in err.reason


# ---- schedules: NNTrainer's formulas at chosen iterations ----------------------------------------


def test_schedules_match_hand_computation() -> None:
    expo = SchedulerSpec("exponential", decay_rate=0.5, decay_steps=10)
    assert learning_rate(0.1, expo, 0) == 0.1
    assert learning_rate(0.1, expo, 10) == pytest.approx(0.05)
    assert learning_rate(0.1, expo, 5) == pytest.approx(0.1 / math.sqrt(2))  # continuous, not staircase
    step = SchedulerSpec("step", learning_rates=(0.1, 0.01, 0.001), iterations=(100, 200))
    # NNTrainer: the first boundary >= t picks the rate (lower_bound), so t = 100 still uses the first
    assert [learning_rate(9.0, step, t) for t in (0, 99, 100, 101, 200, 201, 10**6)] == [
        0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    cos = SchedulerSpec("cosine", max_learning_rate=0.1, min_learning_rate=0.0, decay_steps=100)
    assert learning_rate(9.0, cos, 0) == pytest.approx(0.1)
    assert learning_rate(9.0, cos, 50) == pytest.approx(0.05)
    assert learning_rate(9.0, cos, 25) == pytest.approx(0.05 * (1 + math.sqrt(0.5)))
    assert learning_rate(9.0, cos, 100) == pytest.approx(0.1)  # restarts: t % decay_steps
    lin = SchedulerSpec("linear", max_learning_rate=0.1, min_learning_rate=0.01, decay_steps=100)
    assert [learning_rate(9.0, lin, t) for t in (0, 50, 100, 200)] == pytest.approx([0.1, 0.055, 0.01, 0.01])
    assert learning_rate(0.3, SchedulerSpec(), 12345) == 0.3


def test_schedule_sections_read_their_keys() -> None:
    def sched(body: str) -> ModelSpec:
        return parse_ini("[Optimizer]\nType = sgd\nLearning_rate = 0.5\n[LearningRateScheduler]\n" + body + HEAD)

    const = sched("type = constant\nLearning_rate = 1e-4\n")
    assert const.optimizer.learning_rate == 1e-4 and const.scheduler == SchedulerSpec()
    assert any("0.5 is ignored" in n for n in const.notes)  # as NNTrainer warns
    step = sched("type = step\nlearning_rate = 0.1, 0.01\niteration = 0\n")
    assert step.scheduler == SchedulerSpec("step", learning_rates=(0.1, 0.01), iterations=(0,))
    cos = sched("type = cosine\nmax_learning_rate = 0.1\nmin_learning_rate = 0.001\ndecay_steps = 50\n")
    assert cos.scheduler == SchedulerSpec("cosine", max_learning_rate=0.1, min_learning_rate=0.001, decay_steps=50)
    lin = sched("type = LINEAR\nmax_learning_rate = 0.1\nmin_learning_rate = 0\ndecay_steps = 5\n")
    assert lin.scheduler.type == "linear" and lin.scheduler.min_learning_rate == 0.0
    for spec in (const, step, cos, lin):
        assert parse_ini(to_ini(spec)) == spec
    expo = to_ini(sched("type = exponential\ndecay_rate = 0.9\ndecay_steps = 10\n"))
    body = expo.split("[LearningRateScheduler]")[1].split("\n[")[0]
    assert "Learning_rate = 0.5" in body  # NNTrainer's exponential schedule needs its own learning_rate


def test_the_trainer_follows_the_schedule() -> None:
    """A step schedule's rates reach the optimizer: sgd moves the bias by exactly lr * gradient."""
    from fedpers.nn import Trainer

    spec = parse_ini("[Model]\nloss = mse\n[Optimizer]\nType = sgd\n[LearningRateScheduler]\nType = step\n"
                     "learning_rate = 0.5, 0.25\niteration = 0\n" + HEAD
                     + "[fc]\nType = fully_connected\nUnit = 1\nweight_initializer = zeros\n")
    t = Trainer(spec)
    x, y = np.zeros((2, 1, 1, 4), np.float32), np.ones((2, 1), np.float32)
    biases = []
    for _ in range(3):
        t.fit(x, y, epochs=1, batch_size=2, shuffle=False)
        biases.append(float(t.get_weights()["fc.bias"][0]))
    # dL/db = 2 (b - 1); t = 0: lr 0.5 -> b = 1.0; t = 1, 2: lr 0.25, already at the optimum
    assert biases == pytest.approx([1.0, 1.0, 1.0])
    t2 = Trainer(spec.with_changes(scheduler=SchedulerSpec("step", learning_rates=(0.25, 0.125), iterations=(0,))))
    t2.fit(x, y, epochs=1, batch_size=2, shuffle=False)
    t2.fit(x, y, epochs=1, batch_size=2, shuffle=False)
    assert float(t2.get_weights()["fc.bias"][0]) == pytest.approx(0.5 + 0.125 * 2 * 0.5)


# ---- the layer keys that act ---------------------------------------------------------------------


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


def test_batch_norm_keys_reach_the_layer() -> None:
    from fedpers.nn import init_weights
    from fedpers.nn.layers import LAYERS

    from tests.layer_harness import LayerRun

    spec = parse_ini("[Model]\nloss = mse\n" + HEAD.replace("1:1:4", "2:3:4")
                     + "[bn]\nType = batch_normalization\nmomentum = 0.5\n"
                     "epsilon = 0.1\naxis = 3\ngamma_initializer = zeros\nbeta_initializer = ones\n"
                     "moving_mean_initializer = ones\nmoving_variance_initializer = zeros\n")
    w = init_weights(spec)
    assert w["bn.gamma"].shape == (4,)  # statistics per width position
    assert (w["bn.gamma"] == 0).all() and (w["bn.beta"] == 1).all()
    assert (w["bn.running_mean"] == 1).all() and (w["bn.running_var"] == 0).all()
    lr = LayerRun.build(LAYERS["batch_normalization"](spec.layer("bn")), [(5, 2, 3, 4)])
    lr.weight("running_mean")[...] = 0.0
    lr.weight("running_var")[...] = 1.0
    x = np.random.default_rng(0).standard_normal((5, 2, 3, 4)) * 2 + 1
    lr.forward(x, training=True)
    np.testing.assert_allclose(lr.weight("running_mean"), 0.5 * x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(lr.weight("running_var"), 0.5 + 0.5 * x.var(axis=(0, 1, 2)), rtol=1e-12)
    one_channel = LayerRun.build(LAYERS["batch_normalization"](LayerSpec("b", "batch_normalization")),
                                 [(2, 1, 3, 5)])
    assert one_channel.weight("gamma").shape == (5,)  # NNTrainer's default: width when there is one channel


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


def test_concat_joins_along_nntrainers_axis() -> None:
    from fedpers.nn.layers import LAYERS
    from fedpers.nn.spec import ModelError

    from tests.layer_harness import LayerRun

    rng = np.random.default_rng(0)

    def cat(shapes: list[tuple[int, ...]], **kw) -> tuple[np.ndarray, list[np.ndarray]]:
        lr = LayerRun.build(LAYERS["concat"](LayerSpec("c", "concat", **kw)), shapes)
        xs = [rng.standard_normal(s) for s in shapes]
        return lr.forward(*xs), xs

    out, xs = cat([(2, 3, 2, 2), (2, 1, 2, 2)], axis=1)
    np.testing.assert_array_equal(out, np.concatenate(xs, axis=1))
    out, xs = cat([(2, 3, 2, 2), (2, 3, 2, 5)])  # more than one channel: default width
    np.testing.assert_array_equal(out, np.concatenate(xs, axis=3))
    out, xs = cat([(2, 1, 2, 2), (2, 4, 2, 2)])  # one channel: default channel
    np.testing.assert_array_equal(out, np.concatenate(xs, axis=1))
    out, xs = cat([(2, 3), (2, 4)], axis=3)  # (N, F) is (N, 1, 1, F): features
    np.testing.assert_array_equal(out, np.concatenate(xs, axis=1))
    out, xs = cat([(2, 3), (2, 3)])  # default channel for (N, F): (N, 2, 1, 3)
    np.testing.assert_array_equal(out, np.stack(xs, axis=1)[:, :, None, :])
    with pytest.raises(ModelError) as err:
        cat([(2, 3, 2, 2), (2, 3, 3, 2)], axis=1)
    assert err.value.key == "input_layers"


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


def test_input_shape_on_a_first_layer_and_flatten_true_make_their_layers() -> None:
    text = ("[fc0]\ntype = fully_connected\ninput_shape = 1:1:6\nunit = 4\nflatten = true\n"
            "[fc1]\ntype = fully_connected\nunit = 2\ninput_layers = fc0\n")
    spec = parse_ini(text)
    assert [(ls.name, ls.type) for ls in spec.layers] == [
        ("fc0_input", "input"), ("fc0", "fully_connected"), ("fc0_flatten", "flatten"), ("fc1", "fully_connected")]
    assert spec.layer("fc0_input").input_shape == (1, 1, 6)
    assert spec.layer("fc1").input_layers == ("fc0_flatten",)
    assert any(n.startswith("flatten ([fc0])") for n in spec.notes)
    assert parse_ini(to_ini(spec)) == spec


def test_ini_backbones_bring_their_layers(tmp_path: Path) -> None:
    (tmp_path / "trunk.ini").write_text("[Model]\nEpochs = 99\n[t_in]\nType = input\nInput_Shape = 1:1:6\n"
                                        "[t_fc]\nType = fully_connected\nUnit = 4\ntrainable = true\n")
    model = tmp_path / "model.ini"
    model.write_text("[Model]\nloss = mse\n[trunk]\nbackbone = trunk.ini\ntrainable = false\nInput_Shape = 1:1:6\n"
                     "[head]\nType = fully_connected\nUnit = 2\n")
    spec = load_ini(model)
    assert spec.epochs == 1  # the backbone's training sections are not read
    assert [ls.name for ls in spec.layers] == ["t_in", "t_fc", "head"]
    assert not spec.layer("t_fc").trainable and spec.layer("head").trainable
    assert any(n.startswith("input_shape ([trunk])") for n in spec.notes)
    (tmp_path / "loop.ini").write_text("[self]\nbackbone = loop.ini\n")
    with pytest.raises(IniError, match="includes itself"):
        load_ini(tmp_path / "loop.ini")


def test_data_sections_old_and_new(tmp_path: Path) -> None:
    old = parse_ini("[DataSet]\nBufferSize = 10\nTrainData = \"train.dat\"\nValidData = v.dat\nTestData = t.dat\n"
                    "LabelData = \"label.dat\"\n" + HEAD)
    assert old.dataset == DatasetSpec("train.dat", "v.dat", "t.dat")
    assert any(n.startswith("labeldata") for n in old.notes)
    both = parse_ini("[DataSet]\nTrainData = a.dat\n[train_set]\ntype = file\npath = b.dat\n" + HEAD)
    assert both.dataset.train == "b.dat" and any("replaces" in n for n in both.notes)
    assert parse_ini(to_ini(old)) == old


def test_nntrainer_ini_leaves_out_or_translates_fedpers_only_keys() -> None:
    spec = ModelSpec(
        (LayerSpec("in", "input", input_shape=(1, 1, 4)), LayerSpec("fc", "fully_connected", unit=3, bias_decay=0.5),
         LayerSpec("out", "fully_connected", unit=2, personal=True)),
        optimizer=OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.01))
    text, left = nntrainer_ini(spec)
    assert "personal" not in text and "momentum" not in text.lower().split("[in]")[0]
    back = parse_ini(text)
    assert (back.layer("fc").weight_decay, back.layer("fc").bias_decay) == (0.01, 0.51)
    assert (back.layer("out").weight_decay, back.optimizer.weight_decay) == (0.01, 0.0)
    assert any("personal" in x for x in left) and any("momentum" in x for x in left)
    plain = ModelSpec((LayerSpec("in", "input", input_shape=(1, 1, 4)),))
    assert "momentum" not in to_ini(plain) and "weight_decay" not in to_ini(plain)  # NNTrainer's sgd refuses them
