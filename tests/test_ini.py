"""INI model files: NNTrainer compatibility, every error naming section/key/line, round trips."""

from __future__ import annotations

import random
from dataclasses import fields, replace
from importlib import resources
from pathlib import Path

import pytest
from fedpers.nn.ini import IniError, load_ini, parse_ini, save_ini, to_ini
from fedpers.nn.spec import (
    ACTIVATIONS,
    INITIALIZERS,
    LAYER_KEYS,
    POOLINGS,
    REGULARIZERS,
    RESERVED_SECTIONS,
    DatasetSpec,
    LayerSpec,
    ModelError,
    ModelSpec,
    OptimizerSpec,
    SchedulerSpec,
)

from tests.probes import modules_after

MODELS = Path(__file__).resolve().parent.parent / "common" / "models"
SHIPPED = sorted(p.name for p in MODELS.glob("*.ini"))
HEAD = "[in]\nType = input\nInput_Shape = 1:2:3\n"  # a valid first layer (lines 1-3)

# An NNTrainer-style file as NNTrainer's own examples write them: mixed case, inline comments, quotes.
NNTRAINER_STYLE = """\
# Network Section : Network
[model]
Type = NeuralNetwork\t# Network Type : NeuralNetwork
Epochs = 15\t\t# Epochs
Loss = CROSS  \t\t; cross entropy
Save_Path = "mnist model#1.bin"  \t# model path to save / read
BATCH_SIZE = 32

[OPTIMIZER]
Type = Adam
beta1 = 0.9 \t\t# beta 1 for adam
Beta2 = 0.999
epsilon = 1e-7
Learning_rate = 1e-4

[learningratescheduler]
type = step
learning_rate = 0.1, 0.01, 0.001
iteration = 100, 200

[inputlayer]
Type = input
Input_Shape = 1:28:28

[Conv1]
Type = conv2d
input_layers = InputLayer
kernel_size = 5,5
bias_initializer=zeros
Activation=Sigmoid
weight_initializer = 'xavier_uniform'
filters = 6
stride = 1,1
padding = 0,0
trainable = TRUE
[pool]
type = pooling2d
pool_size = 2
pooling = AVERAGE
[flat]
type=flatten
[out]
type = fully_connected
unit = 10
activation = softmax
personal = True
"""


def test_nntrainer_style_file_parses_case_insensitively() -> None:
    spec = parse_ini(NNTRAINER_STYLE)
    assert (spec.loss, spec.epochs, spec.batch_size) == ("cross", 15, 32)
    assert spec.save_path == "mnist model#1.bin"  # quotes stripped, '#' inside quotes kept
    assert spec.optimizer == OptimizerSpec(type="adam", learning_rate=1e-4, beta1=0.9, beta2=0.999, epsilon=1e-7)
    assert spec.scheduler == SchedulerSpec(type="step", learning_rates=(0.1, 0.01, 0.001), iterations=(100, 200))
    assert [lay.name for lay in spec.layers] == ["inputlayer", "Conv1", "pool", "flat", "out"]
    conv = spec.layer("Conv1")
    assert conv.input_layers == ("inputlayer",)  # reference resolved to the declared spelling
    assert (conv.filters, conv.kernel_size, conv.stride, conv.padding) == (6, (5, 5), (1, 1), (0, 0))
    assert (conv.activation, conv.weight_initializer, conv.bias_initializer) == ("sigmoid", "xavier_uniform", "zeros")
    assert spec.layer("pool").pool_size == (2, 2) and spec.layer("pool").pooling == "average"
    assert spec.layer("out").personal and not spec.layer("Conv1").personal
    assert spec.inputs_of(3) == ("pool",)  # default input: the previous layer


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ("1:28:28", (1, 28, 28)),
        ("1:1:784", (1, 1, 784)),
        ("784", (1, 1, 784)),
        ("28:28", (1, 28, 28)),
        (" 3 : 32 : 32 ", (3, 32, 32)),
    ],
)
def test_input_shape_forms(text: str, shape: tuple[int, int, int]) -> None:
    spec = parse_ini(f"[in]\nType = input\nInput_Shape = {text}\n")
    assert spec.layers[0].input_shape == shape


@pytest.mark.parametrize(
    ("value", "parsed"), [("3", (3, 3)), ("3,5", (3, 5)), ("same", "same"), ("VALID", "valid"), ("0, 1", (0, 1))]
)
def test_padding_forms(value: str, parsed: object) -> None:
    spec = parse_ini(HEAD + f"[c]\nType = conv2d\nfilters = 2\nkernel_size = 1\npadding = {value}\n")
    assert spec.layer("c").padding == parsed
    assert spec.layer("c").kernel_size == (1, 1)


def test_dag_with_addition_and_defaults() -> None:
    text = HEAD + (
        "[a]\nType = fully_connected\nUnit = 4\n"
        "[b]\nType = fully_connected\nUnit = 4\ninput_layers = in\n"
        "[sum]\nType = addition\ninput_layers = a, B\nActivation = relu\n"
        "[out]\nType = fully_connected\nUnit = 2\n"
    )
    spec = parse_ini(text)
    assert spec.inputs_of(1) == ("in",) and spec.inputs_of(2) == ("in",)
    assert spec.layer("sum").input_layers == ("a", "b")
    assert spec.inputs_of(4) == ("sum",)
    assert spec.optimizer == OptimizerSpec() and spec.scheduler == SchedulerSpec()  # sections are optional


def test_scheduler_exponential_and_constant() -> None:
    spec = parse_ini("[LearningRateScheduler]\nType = exponential\ndecay_rate = 0.5\ndecay_steps = 10\n" + HEAD)
    assert spec.scheduler == SchedulerSpec(type="exponential", decay_rate=0.5, decay_steps=10)
    assert parse_ini("[LearningRateScheduler]\nType = Constant\n" + HEAD).scheduler == SchedulerSpec()


# (id, text, section, key, words in the reason, line)
ERRORS = [
    ("no layers", "[Model]\nEpochs = 3\n", "Model", None, "no layer", 1),
    ("empty file", "", "Model", None, "no layer", None),
    ("unknown layer type", HEAD + "[x]\nType = lstm\n", "x", "type", "unknown layer type 'lstm'", 5),
    ("missing type", HEAD + "[x]\nUnit = 3\n", "x", "type", "missing Type", 4),
    ("unknown key", HEAD + "[x]\nType = flatten\ncolour = red\n", "x", "colour", "unknown key", 6),
    (
        "key of another layer type",
        HEAD + "[x]\nType = fully_connected\nUnit = 3\nfilters = 3\n",
        "x",
        "filters",
        "not a key of a fully_connected layer",
        7,
    ),
    (
        "input_shape on fc",
        HEAD + "[x]\nType = fully_connected\nUnit = 3\nInput_Shape = 1:1:3\n",
        "x",
        "input_shape",
        "only the first layer",
        7,
    ),
    ("non-number", HEAD + "[x]\nType = fully_connected\nUnit = ten\n", "x", "unit", "expected an integer", 6),
    ("float for int", HEAD + "[x]\nType = fully_connected\nUnit = 3.5\n", "x", "unit", "expected an integer", 6),
    ("negative unit", HEAD + "[x]\nType = fully_connected\nUnit = -3\n", "x", "unit", "positive", 6),
    ("zero filters", HEAD + "[x]\nType = conv2d\nfilters = 0\n", "x", "filters", "positive", 6),
    (
        "kernel arity",
        HEAD + "[x]\nType = conv2d\nfilters = 2\nkernel_size = 1,2,3\n",
        "x",
        "kernel_size",
        "one or two integers",
        7,
    ),
    ("negative padding", HEAD + "[x]\nType = conv2d\nfilters = 2\npadding = -1,0\n", "x", "padding", ">= 0", 7),
    (
        "bad padding word",
        HEAD + "[x]\nType = conv2d\nfilters = 2\npadding = full\n",
        "x",
        "padding",
        "'same', 'valid'",
        7,
    ),
    (
        "unknown activation",
        HEAD + "[x]\nType = activation\nActivation = gelu\n",
        "x",
        "activation",
        "unknown value 'gelu'",
        6,
    ),
    ("unknown pooling", HEAD + "[x]\nType = pooling2d\npooling = median\n", "x", "pooling", "unknown value", 6),
    (
        "unknown initializer",
        HEAD + "[x]\nType = fully_connected\nUnit = 2\nweight_initializer = lecun\n",
        "x",
        "weight_initializer",
        "unknown value",
        7,
    ),
    ("bad bool", HEAD + "[x]\nType = flatten\ntrainable = maybe\n", "x", "trainable", "true or false", 6),
    ("dropout range", HEAD + "[x]\nType = dropout\ndropout_rate = 1.5\n", "x", "dropout_rate", "[0, 1)", 6),
    ("bn epsilon", HEAD + "[x]\nType = batch_normalization\nepsilon = 0\n", "x", "epsilon", "> 0", 6),
    ("nan", HEAD + "[x]\nType = dropout\ndropout_rate = nan\n", "x", "dropout_rate", "finite", 6),
    (
        "missing input layer",
        HEAD + "[x]\nType = flatten\ninput_layers = nowhere\n",
        "x",
        "input_layers",
        "'nowhere' is not a layer",
        6,
    ),
    (
        "later input layer",
        HEAD + "[x]\nType = flatten\ninput_layers = y\n[y]\nType = flatten\n",
        "x",
        "input_layers",
        "not an earlier layer",
        6,
    ),
    ("own input", HEAD + "[x]\nType = flatten\ninput_layers = x\n", "x", "input_layers", "its own input", 6),
    (
        "input listed twice",
        HEAD + "[x]\nType = addition\ninput_layers = in, in\n",
        "x",
        "input_layers",
        "listed twice",
        6,
    ),
    ("empty input item", HEAD + "[x]\nType = addition\ninput_layers = in,\n", "x", "input_layers", "empty item", 6),
    ("duplicate layer section", HEAD + "[x]\nType = flatten\n[x]\nType = flatten\n", "x", None, "duplicate section", 6),
    ("case-only clash", HEAD + "[x]\nType = flatten\n[X]\nType = flatten\n", "X", None, "clashes with [x]", 6),
    ("duplicate fixed section", "[Model]\n[model]\n" + HEAD, "Model", None, "duplicate section", 2),
    ("duplicate key", HEAD + "[x]\nType = flatten\ntype = flatten\n", "x", "type", "duplicate key", 6),
    (
        "first layer not input",
        "[x]\nType = fully_connected\nUnit = 2\n",
        "x",
        "type",
        "first layer must be an input",
        2,
    ),
    ("second input layer", HEAD + "[x]\nType = input\nInput_Shape = 1:1:1\n", "x", "type", "only the first", 5),
    ("input without shape", "[in]\nType = input\n", "in", "input_shape", "needs Input_Shape", 1),
    ("shape arity", "[in]\nType = input\nInput_Shape = 1:2:3:4\n", "in", "input_shape", "C:H:W", 3),
    ("unknown model key", "[Model]\ncolour = red\n" + HEAD, "Model", "colour", "unknown key", 2),
    ("unknown loss", "[Model]\nLoss = hinge\n" + HEAD, "Model", "loss", "unknown value", 2),
    ("zero epochs", "[Model]\nEpochs = 0\n" + HEAD, "Model", "epochs", "positive", 2),
    ("negative batch", "[Model]\nbatch_size = -4\n" + HEAD, "Model", "batch_size", "positive", 2),
    ("optimizer type", "[Optimizer]\nType = rmsprop\n" + HEAD, "Optimizer", "type", "unknown value", 2),
    (
        "adam momentum",
        "[Optimizer]\nType = adam\nmomentum = 0.9\n" + HEAD,
        "Optimizer",
        "momentum",
        "unknown key for Type = adam",
        3,
    ),
    ("sgd beta1", "[Optimizer]\nType = sgd\nbeta1 = 0.9\n" + HEAD, "Optimizer", "beta1", "unknown key", 3),
    ("zero lr", "[Optimizer]\nType = sgd\nLearning_rate = 0\n" + HEAD, "Optimizer", "learning_rate", "> 0", 3),
    (
        "negative lr",
        "[Optimizer]\nType = sgd\nLearning_rate = -0.1\n" + HEAD,
        "Optimizer",
        "learning_rate",
        "negative",
        3,
    ),
    ("momentum range", "[Optimizer]\nType = sgd\nmomentum = 1.0\n" + HEAD, "Optimizer", "momentum", "[0, 1)", 3),
    (
        "scheduler type",
        "[LearningRateScheduler]\nType = polynomial\n" + HEAD,
        "LearningRateScheduler",
        "type",
        "unknown value",
        2,
    ),
    (
        "exponential without rate",
        "[LearningRateScheduler]\nType = exponential\ndecay_steps = 3\n" + HEAD,
        "LearningRateScheduler",
        "decay_rate",
        "needs decay_rate",
        1,
    ),
    (
        "step arity",
        "[LearningRateScheduler]\nType = step\nlearning_rate = 0.1\niteration = 3\n" + HEAD,
        "LearningRateScheduler",
        "iteration",
        "N+1",
        4,
    ),
    (
        "step order",
        "[LearningRateScheduler]\nType = step\nlearning_rate = 0.1,0.2,0.3\niteration = 5,3\n" + HEAD,
        "LearningRateScheduler",
        "iteration",
        "increasing",
        4,
    ),
    (
        "step key on constant",
        "[LearningRateScheduler]\nType = constant\niteration = 3\n" + HEAD,
        "LearningRateScheduler",
        "iteration",
        "unknown key",
        3,
    ),
    ("data set type", "[train_set]\ntype = directory\npath = x\n" + HEAD, "train_set", "type", "Type = file", 2),
    ("key outside section", "Epochs = 3\n" + HEAD, "?", "epochs", "outside any section", 1),
    ("no equals", HEAD + "[x]\nType flatten\n", "x", None, "key = value", 5),
    ("unclosed header", HEAD + "[x\nType = flatten\n", "x", None, "without ']'", 4),
    ("bad layer name", HEAD + "[a.b]\nType = flatten\n", "a.b", None, "layer name", 4),
]


@pytest.mark.parametrize(
    ("text", "section", "key", "reason", "line"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors_name_section_key_reason_and_line(
    text: str, section: str, key: str | None, reason: str, line: int | None
) -> None:
    with pytest.raises(ModelError) as info:
        parse_ini(text)
    err = info.value
    assert isinstance(err, IniError) and isinstance(err, ValueError)
    assert (err.section, err.key) == (section, key)
    assert reason in err.reason
    assert err.line == line
    assert f"[{section}]" in str(err) and (key is None or key in str(err))
    if line is not None:
        assert str(err).startswith(f"line {line}: ")


def test_load_ini_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.ini"
    path.write_text(HEAD + "[x]\nType = fully_connected\nUnit = 0\n")
    with pytest.raises(ModelError, match=r"bad\.ini:6: \[x\] unit: must be positive"):
        load_ini(path)


# ------------------------------------------------------------------------------------------ shipped models


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_round_trips(name: str, tmp_path: Path) -> None:
    spec = load_ini(MODELS / name)
    assert parse_ini(to_ini(spec)) == spec
    save_ini(spec, tmp_path / name)
    assert load_ini(tmp_path / name) == spec
    assert spec.layers[0].type == "input" and spec.loss == "cross"
    assert spec.layers[-1].activation == "softmax" and spec.layers[-1].unit == 10


def test_save_ini_failing_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    """A write that dies before the rename (here: fsync fails) leaves the previous file whole."""
    import os

    target = tmp_path / "model.ini"
    old = load_ini(MODELS / "mlp.ini")
    save_ini(old, target)
    before = target.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        save_ini(replace(old, epochs=99), target)
    monkeypatch.undo()
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.ini"]
    save_ini(replace(old, epochs=99), target)
    assert load_ini(target).epochs == 99 and [p.name for p in tmp_path.iterdir()] == ["model.ini"]


def test_shipped_models_are_package_data() -> None:
    names = {p.name for p in resources.files("fedpers").joinpath("models").iterdir() if p.name.endswith(".ini")}
    assert {
        "digits_cnn.ini",
        "digits_cnn_personal.ini",
        "mlp.ini",
        "lenet5.ini",
        "vgg_small.ini",
        "vgg_small_frozen.ini",
    } <= names


def _conv_fc(spec: ModelSpec) -> list[tuple]:
    return [
        (lay.type, lay.filters or lay.unit, lay.kernel_size, lay.padding)
        for lay in spec.layers
        if lay.type in ("conv2d", "fully_connected", "pooling2d")
    ]


def test_shipped_architectures() -> None:
    mlp = load_ini(MODELS / "mlp.ini")
    assert mlp.layers[0].input_shape == (1, 1, 784)
    assert [lay.unit for lay in mlp.layers[1:]] == [512, 512, 10] and mlp.optimizer.type == "sgd"
    lenet = load_ini(MODELS / "lenet5.ini")
    assert lenet.layers[0].input_shape == (1, 28, 28)
    assert _conv_fc(lenet) == [
        ("conv2d", 6, (5, 5), (2, 2)),
        ("pooling2d", None, None, None),
        ("conv2d", 16, (5, 5), None),
        ("pooling2d", None, None, None),
        ("fully_connected", 120, None, None),
        ("fully_connected", 84, None, None),
        ("fully_connected", 10, None, None),
    ]
    vgg = load_ini(MODELS / "vgg_small.ini")
    assert vgg.layers[0].input_shape == (3, 32, 32)
    convs = [lay for lay in vgg.layers if lay.type == "conv2d"]
    assert [c.filters for c in convs] == [64, 64, 128, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) and c.padding == "same" and c.activation == "relu" for c in convs)
    assert [lay.unit for lay in vgg.layers if lay.type == "fully_connected"] == [256, 10]
    assert sum(lay.type == "pooling2d" for lay in vgg.layers) == 3
    digits = load_ini(MODELS / "digits_cnn.ini")
    assert digits.layers[0].input_shape == (1, 8, 8) and not any(lay.personal for lay in digits.layers)


def test_frozen_and_personal_variants_differ_only_where_they_say() -> None:
    vgg, frozen = load_ini(MODELS / "vgg_small.ini"), load_ini(MODELS / "vgg_small_frozen.ini")
    thawed = tuple(replace(lay, trainable=True) for lay in frozen.layers)
    assert frozen.with_changes(layers=thawed) == vgg
    assert {lay.name for lay in frozen.layers if not lay.trainable} == {
        lay.name for lay in vgg.layers if lay.type == "conv2d"
    }
    digits, personal = load_ini(MODELS / "digits_cnn.ini"), load_ini(MODELS / "digits_cnn_personal.ini")
    assert [lay.name for lay in personal.layers if lay.personal] == ["fc1", "output"]
    shared = tuple(replace(lay, personal=False) for lay in personal.layers)
    assert personal.with_changes(layers=shared) == digits


# ------------------------------------------------------------------------------------------ random round trips


def _name(rng: random.Random, taken: set[str]) -> str:
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
    while True:
        name = rng.choice("abcXYZ") + "".join(rng.choice(chars) for _ in range(rng.randint(0, 8)))
        if name.lower() not in taken and name.lower() not in RESERVED_SECTIONS:
            taken.add(name.lower())
            return name


def _pair(rng: random.Random, lo: int = 1) -> tuple[int, int]:
    return (rng.randint(lo, 7), rng.randint(lo, 7))


FIELD_MAKERS = {
    "unit": lambda r: r.randint(1, 4096),
    "filters": lambda r: r.randint(1, 512),
    "kernel_size": _pair,
    "stride": _pair,
    "pool_size": _pair,
    "padding": lambda r: r.choice(["same", "valid", _pair(r, 0)]),
    "pooling": lambda r: r.choice(POOLINGS),
    "activation": lambda r: r.choice(ACTIVATIONS),
    "weight_initializer": lambda r: r.choice(INITIALIZERS),
    "bias_initializer": lambda r: r.choice(INITIALIZERS),
    "dropout_rate": lambda r: r.choice([0.0, 0.5, r.random() * 0.999]),
    "epsilon": lambda r: r.choice([1e-5, 1e-3, r.uniform(1e-9, 1.0)]),
    "momentum": lambda r: r.choice([0.0, 0.99, 1.0, r.random()]),
    "normalization": lambda r: r.choice([True, False]),
    "standardization": lambda r: r.choice([True, False]),
    "axis": lambda r: r.randint(1, 3),
    "weight_regularizer": lambda r: r.choice(REGULARIZERS),
    "weight_regularizer_constant": lambda r: r.choice([0.0, 0.005, r.random()]),
    "weight_decay": lambda r: r.choice([0.0, 1e-4, r.random()]),
    "bias_decay": lambda r: r.choice([0.0, 1e-4, r.random()]),
    "gamma_initializer": lambda r: r.choice(INITIALIZERS),
    "beta_initializer": lambda r: r.choice(INITIALIZERS),
    "moving_mean_initializer": lambda r: r.choice(INITIALIZERS),
    "moving_variance_initializer": lambda r: r.choice(INITIALIZERS),
}


def random_spec(seed: int) -> ModelSpec:
    rng = random.Random(seed)
    taken: set[str] = set()
    layers = [
        LayerSpec(_name(rng, taken), "input", input_shape=(rng.randint(1, 4), rng.randint(1, 64), rng.randint(1, 64)))
    ]
    kinds = sorted(set(LAYER_KEYS) - {"input"})
    for _ in range(rng.randint(0, 12)):
        kind = rng.choice(kinds)
        fields = {k: FIELD_MAKERS[k](rng) for k in sorted(LAYER_KEYS[kind] - {"input_shape"}) if rng.random() < 0.6}
        names = [lay.name for lay in layers]
        if kind == "addition" or rng.random() < 0.2:
            fields["input_layers"] = tuple(rng.sample(names, rng.randint(1, min(3, len(names)))))
        if rng.random() < 0.2:
            fields["trainable"] = False
        if rng.random() < 0.2:
            fields["personal"] = True
        layers.append(LayerSpec(_name(rng, taken), kind, **fields))
    if rng.random() < 0.5:
        opt = OptimizerSpec(
            "sgd",
            learning_rate=rng.uniform(1e-6, 2.0),
            momentum=rng.choice([0.0, 0.9, rng.random()]),
            weight_decay=rng.choice([0.0, rng.uniform(0, 0.1)]),
        )
    else:
        opt = OptimizerSpec(
            "adam",
            learning_rate=rng.choice([1e-3, 10 ** rng.uniform(-6, 0)]),
            weight_decay=rng.choice([0.0, 1e-4]),
            beta1=rng.random(),
            beta2=rng.random(),
            epsilon=rng.choice([1e-7, 1e-8, rng.uniform(1e-12, 1e-3)]),
        )
    sched = rng.choice(
        [
            SchedulerSpec(),
            SchedulerSpec("exponential", decay_rate=rng.uniform(0.01, 1.0), decay_steps=rng.randint(1, 10_000)),
            SchedulerSpec(
                "step", learning_rates=(0.1, 0.01, rng.random() + 1e-9), iterations=(10, 10 + rng.randint(1, 99))
            ),
            SchedulerSpec("step", learning_rates=(1.0, 0.5), iterations=(0,)),
            SchedulerSpec("cosine", max_learning_rate=0.1, min_learning_rate=rng.choice([0.0, 1e-4]),
                          decay_steps=rng.randint(1, 1000)),
            SchedulerSpec("linear", max_learning_rate=rng.uniform(0.01, 1), min_learning_rate=0.001,
                          decay_steps=rng.randint(1, 1000)),
        ]
    )
    data = rng.choice([DatasetSpec(), DatasetSpec(train="train.dat"),
                       DatasetSpec(train="a b/t.dat", valid="v.dat", test="/abs/t#1.dat")])
    save = rng.choice([None, "model.bin", "dir with space/m#1;x.bin", " padded ", "it's.bin"])
    return ModelSpec(
        tuple(layers),
        loss=rng.choice(["cross", "mse"]),
        epochs=rng.randint(1, 500),
        batch_size=rng.randint(1, 1024),
        optimizer=opt,
        scheduler=sched,
        save_path=save,
        dataset=data,
        continue_train=rng.random() < 0.3,
        tensor_format=rng.choice(["NCHW", "NCHW", "NHWC"]),
        model_tensor_type=rng.choice(["FP32-FP32", "FP32-FP32", "FP16-FP16"]),
    )


@pytest.mark.parametrize("seed", range(300))
def test_random_specs_round_trip(seed: int) -> None:
    spec = random_spec(seed)
    text = to_ini(spec)
    assert parse_ini(text) == spec
    assert to_ini(parse_ini(text)) == text


def test_round_trip_survives_case_changes() -> None:
    spec = random_spec(7)
    text = to_ini(spec)
    names = {f"[{lay.name}]" for lay in spec.layers}
    shouted = "\n".join(
        line if line in names or line.startswith(("Save_Path", "path =")) else line.upper()
        for line in text.splitlines()
    )
    assert parse_ini(shouted) == spec


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        (
            ModelSpec((LayerSpec("in", "input", input_shape=(1, 1, 1)),), optimizer=OptimizerSpec("sgd", beta1=0.5)),
            "beta1",
        ),
        (
            ModelSpec(
                (LayerSpec("in", "input", input_shape=(1, 1, 1)),), optimizer=OptimizerSpec("adam", momentum=0.5)
            ),
            "momentum",
        ),
        (
            ModelSpec((LayerSpec("in", "input", input_shape=(1, 1, 1)),), scheduler=SchedulerSpec(decay_rate=0.5)),
            "decay_rate",
        ),
        (ModelSpec((LayerSpec("in", "input", input_shape=(1, 1, 1)),), save_path='a"b'), "save_path"),
        (ModelSpec((LayerSpec("in", "input", input_shape=(1, 1, 1)), LayerSpec("IN", "flatten"))), None),
    ],
    ids=["sgd-beta1", "adam-momentum", "constant-decay", "quote-in-path", "case-clash"],
)
def test_to_ini_refuses_what_ini_cannot_say(spec: ModelSpec, key: str | None) -> None:
    with pytest.raises(ModelError) as info:
        to_ini(spec)
    assert info.value.key == key


# ------------------------------------------------------------------------------------------ shapes (graph)


def _compile_error(text: str) -> ModelError:
    from fedpers.nn import graph

    spec = parse_ini(text)
    with pytest.raises(ModelError) as info:
        graph.compile(spec, 2, allocate=False)
    return info.value


def test_conv_kernel_bigger_than_input_is_a_model_error() -> None:
    err = _compile_error(
        "[in]\nType = input\nInput_Shape = 1:4:4\n"
        "[conv]\nType = conv2d\nfilters = 2\nkernel_size = 5,5\n"
        "[flat]\nType = flatten\n[out]\nType = fully_connected\nUnit = 2\nActivation = softmax\n"
    )
    assert err.section == "conv"


def test_pool_bigger_than_input_is_a_model_error() -> None:
    err = _compile_error(
        "[in]\nType = input\nInput_Shape = 1:2:2\n"
        "[pool]\nType = pooling2d\npool_size = 3,3\nstride = 3,3\n"
        "[flat]\nType = flatten\n[out]\nType = fully_connected\nUnit = 2\nActivation = softmax\n"
    )
    assert err.section == "pool"


def test_addition_of_different_shapes_is_a_model_error() -> None:
    err = _compile_error(
        HEAD + "[a]\nType = fully_connected\nUnit = 4\n"
        "[b]\nType = fully_connected\nUnit = 5\ninput_layers = in\n"
        "[sum]\nType = addition\ninput_layers = a, b\n"
        "[out]\nType = fully_connected\nUnit = 2\nActivation = softmax\n"
    )
    assert err.section == "sum"


# ------------------------------------------------------------------------------------------ light imports


def test_reading_an_ini_loads_no_trainer_and_no_numba() -> None:
    """The server reads model files (and a device checks its data) without numba's start-up or the trainer."""
    mods = modules_after(
        "import fedpers.nn.ini as ini, fedpers.models as models\n"
        "from fedpers.nn import DataError, ModelSpec, WeightError, load_ini\n"
        "spec = ini.load_ini(models.path('digits_cnn.ini'))\n"
        "assert isinstance(spec, ModelSpec) and load_ini is ini.load_ini\n"
        "assert [l.type for l in spec.layers][:2] == ['input', 'conv2d']"
    )
    assert "fedpers.nn.spec" in mods  # the probe ran what it claims
    assert "numba" not in mods
    light = {"fedpers.nn.ini", "fedpers.nn.spec", "fedpers.nn.errors", "fedpers.nn.layers"}  # layers: its KINDS only
    loaded = {m for m in mods if m.startswith("fedpers.nn.")} - light
    assert loaded == set(), f"reading an INI file imported {sorted(loaded)}"


def test_layer_keys_come_from_the_kinds_table() -> None:
    """One table: spec's keys and the LAYERS registry list the same kinds; every key is a LayerSpec field."""
    from fedpers.nn.layers import KINDS, LAYERS

    assert list(LAYER_KEYS) == list(KINDS) == list(LAYERS)
    spec_fields = {f.name for f in fields(LayerSpec)}
    for kind, keys in LAYER_KEYS.items():
        assert keys == KINDS[kind].keys and keys <= spec_fields, kind
