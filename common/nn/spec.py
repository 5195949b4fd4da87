"""What a model is: plain, frozen records built from the Python API or read from INI files.

Layers see typed fields, never string property bags; `ini.py` is the only place that parses text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .layers import KINDS

LOSSES = ("cross", "mse")
OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("constant", "exponential", "step", "cosine", "linear")
ACTIVATIONS = ("relu", "sigmoid", "tanh", "softmax", "none")
INITIALIZERS = (
    "xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal", "zeros", "ones",
)  # fmt: skip
POOLINGS = ("max", "average", "global_max", "global_average")
REGULARIZERS = ("l2norm", "none")
TENSOR_FORMATS = ("NCHW", "NHWC")
# NNTrainer's model_tensor_type values (weight-activation); fedpers computes everything in float32.
MODEL_TENSOR_TYPES = (
    "FP32-FP32", "FP16-FP16", "FP16-FP32", "FP32-FP16", "BCQ-FP32", "QINT4-FP16", "QINT4-FP32", "QINT8-FP16",
    "QINT8-FP32", "QINT16-QINT16", "UINT16-UINT16", "QINT8-UINT16", "UINT4-UINT8", "UINT4-UINT16", "UINT8-UINT8",
    "UINT8-UINT16", "Q4_K-FP32", "Q4_0-FP32", "Q4_0-FP16",
)  # fmt: skip
# Section names a layer may not take (case-insensitive).
RESERVED_SECTIONS = (
    "model", "optimizer", "learningratescheduler", "dataset", "train_set", "valid_set", "test_set",
)  # fmt: skip

# Which LayerSpec fields each layer type accepts (besides name, type, input_layers, trainable, personal):
# read from the one table of layer kinds, which also names each kind's module (imported only when used).
class _LayerKeys(Mapping[str, frozenset[str]]):
    """A live view of KINDS' keys, so a kind added later (layers.add_kind) is known to the parser."""

    def __getitem__(self, kind: str) -> frozenset[str]:
        return KINDS[kind].keys

    def __iter__(self) -> Iterator[str]:
        return iter(KINDS)

    def __len__(self) -> int:
        return len(KINDS)


LAYER_KEYS: Mapping[str, frozenset[str]] = _LayerKeys()
COMMON_KEYS = frozenset({"input_layers", "trainable", "personal"})


class ModelError(ValueError):
    """A model description is wrong; the message names the section, key and reason."""

    def __init__(self, section: str, key: str | None, reason: str) -> None:
        self.section, self.key, self.reason = section, key, reason
        where = (f"[{section}]" if section else "") + (f" {key}" if key else "")
        super().__init__(f"{where}: {reason}" if where else reason)


Padding = str | tuple[int, int]  # "same" | "valid" | (pad_h, pad_w)


@dataclass(frozen=True)
class LayerSpec:
    """One layer section. Unset fields are None and take the layer's default."""

    name: str
    type: str
    input_layers: tuple[str, ...] = ()  # () means: the previous layer in file order
    trainable: bool = True
    personal: bool = False  # personal layers never leave the device
    input_shape: tuple[int, int, int] | None = None  # C, H, W
    unit: int | None = None
    filters: int | None = None
    kernel_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    padding: Padding | None = None
    pool_size: tuple[int, int] | None = None
    pooling: str | None = None
    activation: str | None = None
    weight_initializer: str | None = None
    bias_initializer: str | None = None
    dropout_rate: float | None = None
    epsilon: float | None = None
    momentum: float | None = None
    # NNTrainer vocabulary (appended, so INI files written before keep their key order)
    normalization: bool | None = None  # input: min-max scale the batch to [0, 1]
    standardization: bool | None = None  # input: per example, NNTrainer's (x - mean) / (||x - mean|| / F)
    axis: int | None = None  # batch_normalization: statistics per this NCHW axis; concat: joined axis (1..3)
    weight_regularizer: str | None = None  # "l2norm": weight_regularizer_constant * W added to dL/dW
    weight_regularizer_constant: float | None = None
    weight_decay: float | None = None  # added to the gradient of weight / gamma (per layer, like NNTrainer)
    bias_decay: float | None = None  # added to the gradient of bias / beta
    gamma_initializer: str | None = None
    beta_initializer: str | None = None
    moving_mean_initializer: str | None = None
    moving_variance_initializer: str | None = None

    def __post_init__(self) -> None:
        # '#', ';' and quotes would be read as comments/quoting in an INI file.
        if not self.name or any(c in self.name for c in " .:,[]=\t\n#;\"'"):
            raise ModelError(self.name or "?", None, "layer name: non-empty, no spaces or . : , [ ] = # ; quotes")
        if self.type not in LAYER_KEYS:
            raise ModelError(self.name, "type", f"unknown layer type {self.type!r}; known: {sorted(LAYER_KEYS)}")
        allowed = LAYER_KEYS[self.type] | COMMON_KEYS
        for f in fields(self):
            if f.name in ("name", "type") or f.name in allowed:
                continue
            if getattr(self, f.name) != f.default:
                raise ModelError(self.name, f.name, f"not a key of a {self.type} layer")
        self._check_values()

    def _check_values(self) -> None:
        def bad(key: str, reason: str) -> ModelError:
            return ModelError(self.name, key, reason)

        for key in ("unit", "filters"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise bad(key, f"must be a positive integer, got {v!r}")
        for key in ("kernel_size", "stride", "pool_size", "input_shape"):
            v = getattr(self, key)
            if v is not None and (not all(isinstance(x, int) and x > 0 for x in v)):
                raise bad(key, f"must be positive integers, got {v!r}")
        if isinstance(self.padding, str) and self.padding not in ("same", "valid"):
            raise bad("padding", f"must be 'same', 'valid' or 'a,b', got {self.padding!r}")
        if isinstance(self.padding, tuple) and not all(isinstance(x, int) and x >= 0 for x in self.padding):
            raise bad("padding", f"must be non-negative integers, got {self.padding!r}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise bad("activation", f"unknown activation {self.activation!r}; known: {list(ACTIVATIONS)}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise bad("pooling", f"unknown pooling {self.pooling!r}; known: {list(POOLINGS)}")
        for key in ("weight_initializer", "bias_initializer", "gamma_initializer", "beta_initializer",
                    "moving_mean_initializer", "moving_variance_initializer"):
            v = getattr(self, key)
            if v is not None and v not in INITIALIZERS:
                raise bad(key, f"unknown initializer {v!r}; known: {list(INITIALIZERS)}")
        if self.axis is not None and (not isinstance(self.axis, int) or not 1 <= self.axis <= 3):
            raise bad("axis", f"must be 1 (channel), 2 (height) or 3 (width), got {self.axis!r}")
        if self.weight_regularizer is not None and self.weight_regularizer not in REGULARIZERS:
            raise bad("weight_regularizer", f"unknown regularizer {self.weight_regularizer!r}; known: "
                                            f"{list(REGULARIZERS)}")
        for key in ("weight_regularizer_constant", "weight_decay", "bias_decay"):
            v = getattr(self, key)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise bad(key, f"must be a finite number >= 0, got {v}")
        if self.dropout_rate is not None and not 0.0 <= self.dropout_rate < 1.0:
            raise bad("dropout_rate", f"must be in [0, 1), got {self.dropout_rate}")
        if self.epsilon is not None and not self.epsilon > 0:
            raise bad("epsilon", f"must be > 0, got {self.epsilon}")
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            raise bad("momentum", f"must be in [0, 1], got {self.momentum}")


@dataclass(frozen=True)
class OptimizerSpec:
    type: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-7

    def __post_init__(self) -> None:
        if self.type not in OPTIMIZERS:
            raise ModelError("Optimizer", "type", f"unknown optimizer {self.type!r}; known: {list(OPTIMIZERS)}")
        if not self.learning_rate > 0:
            raise ModelError("Optimizer", "learning_rate", f"must be > 0, got {self.learning_rate}")
        for key in ("momentum", "beta1", "beta2"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise ModelError("Optimizer", key, f"must be in [0, 1), got {v}")
        if self.weight_decay < 0:
            raise ModelError("Optimizer", "weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not self.epsilon > 0:
            raise ModelError("Optimizer", "epsilon", f"must be > 0, got {self.epsilon}")


@dataclass(frozen=True)
class SchedulerSpec:
    """Learning-rate schedule over the 0-based iteration (batch) count t, as NNTrainer computes it:
    constant: lr; exponential: lr * decay_rate ** (t / decay_steps);
    step: learning_rates[k], k = how many of `iterations` are < t (learning_rates has one more entry);
    cosine: min + (max - min) * (1 + cos(pi * (t % decay_steps) / decay_steps)) / 2;
    linear: max(min, max - (max - min) * t / decay_steps).
    lr is OptimizerSpec.learning_rate (an INI's scheduler learning_rate is read into it)."""

    type: str = "constant"
    decay_rate: float | None = None
    decay_steps: int | None = None
    learning_rates: tuple[float, ...] = ()
    iterations: tuple[int, ...] = ()
    max_learning_rate: float | None = None
    min_learning_rate: float | None = None

    def __post_init__(self) -> None:
        sec = "LearningRateScheduler"
        if self.type not in SCHEDULERS:
            raise ModelError(sec, "type", f"unknown scheduler {self.type!r}; known: {list(SCHEDULERS)}")
        if self.type in ("exponential", "cosine", "linear"):
            if self.decay_steps is None or self.decay_steps <= 0:
                raise ModelError(sec, "decay_steps", f"{self.type} needs a positive decay_steps")
        if self.type == "exponential":
            if self.decay_rate is None or not (self.decay_rate > 0 and math.isfinite(self.decay_rate)):
                raise ModelError(sec, "decay_rate", "exponential needs decay_rate > 0")
        if self.type == "step":
            if len(self.learning_rates) != len(self.iterations) + 1 or not self.iterations:
                raise ModelError(sec, "iteration", "step needs N iterations and N+1 learning_rate values")
            its = self.iterations
            if self.iterations[0] < 0 or any(b <= a for a, b in zip(its, its[1:], strict=False)):
                raise ModelError(sec, "iteration", "iterations must be >= 0 and strictly increasing")
            if not all(lr > 0 for lr in self.learning_rates):
                raise ModelError(sec, "learning_rate", "learning rates must be > 0")
        if self.type in ("cosine", "linear"):
            hi, lo = self.max_learning_rate, self.min_learning_rate
            if hi is None or not hi > 0:
                raise ModelError(sec, "max_learning_rate", f"{self.type} needs max_learning_rate > 0")
            if lo is None or not 0 <= lo <= hi:
                raise ModelError(sec, "min_learning_rate", f"{self.type} needs 0 <= min_learning_rate <= max")


@dataclass(frozen=True)
class DatasetSpec:
    """NNTrainer's data files ([train_set] / [valid_set] / [test_set] path, or the older [DataSet]
    TrainData / ValidData / TestData): raw float32 examples, each its input then its one-hot label.
    Relative paths are relative to the model file, as NNTrainer resolves them."""

    train: str | None = None
    valid: str | None = None
    test: str | None = None

    def __post_init__(self) -> None:
        for key, sec in (("train", "train_set"), ("valid", "valid_set"), ("test", "test_set")):
            v = getattr(self, key)
            if v is not None and (not v or any(c in v for c in '"\n\r')):
                raise ModelError(sec, "path", "a data file path must be non-empty, without quotes or newlines")

    def __bool__(self) -> bool:
        return any((self.train, self.valid, self.test))


@dataclass(frozen=True)
class ModelSpec:
    """A whole model: layers in file order plus training settings.

    `notes` name what an NNTrainer file said that fedpers accepts but does not act on (one line per
    key); they are not part of the model's identity (compare=False) and `to_ini` does not write them."""

    layers: tuple[LayerSpec, ...]
    loss: str = "cross"
    epochs: int = 1
    batch_size: int = 32
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    save_path: str | None = None
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    continue_train: bool = False
    tensor_format: str = "NCHW"
    model_tensor_type: str = "FP32-FP32"
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "notes", tuple(self.notes))
        if not self.layers:
            raise ModelError("Model", None, "a model needs at least one layer")
        if self.loss not in LOSSES:
            raise ModelError("Model", "loss", f"unknown loss {self.loss!r}; known: {list(LOSSES)}")
        if self.epochs <= 0:
            raise ModelError("Model", "epochs", f"must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise ModelError("Model", "batch_size", f"must be positive, got {self.batch_size}")
        if self.tensor_format not in TENSOR_FORMATS:
            raise ModelError("Model", "tensor_format", f"must be one of {list(TENSOR_FORMATS)}, got "
                                                       f"{self.tensor_format!r}")
        if self.model_tensor_type not in MODEL_TENSOR_TYPES:
            raise ModelError("Model", "model_tensor_type", f"unknown type {self.model_tensor_type!r}; known: "
                                                           f"{list(MODEL_TENSOR_TYPES)}")
        seen: set[str] = set()
        for i, layer in enumerate(self.layers):
            if layer.name in seen:
                raise ModelError(layer.name, None, "duplicate layer name")
            if layer.name.lower() in RESERVED_SECTIONS:
                raise ModelError(layer.name, None, "layer name collides with a reserved section")
            if i == 0 and layer.input_layers:
                raise ModelError(layer.name, "input_layers", "the first layer cannot name inputs")
            for src in layer.input_layers:
                if src not in seen:
                    known = "an earlier layer" if src in {lay.name for lay in self.layers} else "a layer"
                    raise ModelError(layer.name, "input_layers", f"{src!r} is not {known} of this model")
            seen.add(layer.name)

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def inputs_of(self, index: int) -> tuple[str, ...]:
        """Resolved input layer names of layer `index` (default: the previous layer)."""
        spec = self.layers[index]
        if spec.input_layers:
            return spec.input_layers
        return (self.layers[index - 1].name,) if index > 0 else ()

    def with_changes(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)
