"""NNTrainer INI model files <-> ModelSpec.

The text is parsed once, here, into the frozen records of `spec.py`; nothing downstream sees strings.
Like NNTrainer, keys and the fixed section names ([Model], [Optimizer], [LearningRateScheduler],
[DataSet], [train_set], [valid_set], [test_set]) are case-insensitive, and so are enum values; layer
section names keep their case. A small hand parser (not configparser) gives ordered sections,
duplicate detection and an error that names the line.

NNTrainer's own files load unchanged: every key NNTrainer accepts is either read into a typed field
or, when it means nothing here, accepted and named once in `ModelSpec.notes` (the vocabulary is the
tables below, taken from NNTrainer's loader and property lists). What is really wrong (a bad value,
a key nobody knows, a layer or loss fedpers does not implement) is an `IniError` naming the line.
`to_ini` writes what NNTrainer reads; `nntrainer_ini` also drops or translates fedpers-only keys.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .spec import (
    ACTIVATIONS,
    COMMON_KEYS,
    INITIALIZERS,
    LAYER_KEYS,
    LOSSES,
    MODEL_TENSOR_TYPES,
    OPTIMIZERS,
    POOLINGS,
    REGULARIZERS,
    SCHEDULERS,
    TENSOR_FORMATS,
    DatasetSpec,
    LayerSpec,
    ModelError,
    ModelSpec,
    OptimizerSpec,
    SchedulerSpec,
)

__all__ = ["IniError", "load_ini", "nntrainer_ini", "parse_ini", "save_ini", "to_ini"]

MODEL, OPTIMIZER, SCHEDULER = "Model", "Optimizer", "LearningRateScheduler"
DATASET, TRAIN_SET, VALID_SET, TEST_SET = "DataSet", "train_set", "valid_set", "test_set"
FIXED_SECTIONS = {s.lower(): s for s in (MODEL, OPTIMIZER, SCHEDULER, DATASET, TRAIN_SET, VALID_SET, TEST_SET)}

MODEL_KEYS = ("type", "epochs", "loss", "batch_size", "save_path", "continue_train", "tensor_format",
              "model_tensor_type")  # fmt: skip
# NNTrainer's deprecated way to give the optimizer: [Model] Optimizer = adam plus these keys.
LEGACY_OPTIMIZER_KEYS = ("optimizer", "learning_rate", "decay_rate", "decay_steps", "beta1", "beta2", "epsilon")
# [Model] keys NNTrainer accepts that fedpers does not act on, and why.
MODEL_NOTES = {
    "save_best_path": "fedpers does not keep a best-epoch copy; nothing is written there",
    "memory_optimization": "fedpers always plans memory (see --memory and --memory-budget)",
    "fsu": "flash-storage weight streaming is NNTrainer's; fedpers swaps activations instead (--memory swap)",
    "fsu_path": "flash-storage weight streaming is NNTrainer's (see fsu)",
    "fsu_lookahead": "flash-storage weight streaming is NNTrainer's (see fsu)",
    "loss_scale": "mixed-precision loss scaling: fedpers trains in float32",
    "clip_grad_by_norm": "gradient clipping is not applied here: training differs from NNTrainer",
    "input_layers": "fedpers feeds the first layer",
    "label_layers": "fedpers feeds the labels to the loss it appends",
    "tensor_type": "NNTrainer's loader skips this key too",
}

OPTIMIZER_KEYS = {  # what each optimizer type reads ([Optimizer] section or the legacy [Model] keys)
    "sgd": ("type", "learning_rate", "decay_rate", "decay_steps", "momentum", "weight_decay"),
    "adam": ("type", "learning_rate", "decay_rate", "decay_steps", "beta1", "beta2", "epsilon", "weight_decay",
             "torch_ref"),
}  # fmt: skip
FEDPERS_OPTIMIZER_KEYS = ("momentum", "weight_decay")  # fedpers extensions NNTrainer's sgd / adam do not take
DEFAULT_LEARNING_RATE = {"sgd": 1e-4, "adam": 1e-3}  # NNTrainer's, when a file gives none
OPTIMIZER_NOTES = {  # fedpers's Adam is PyTorch's: epsilon added to sqrt(v / (1 - beta2^t))
    "torch_ref": "fedpers's Adam always takes PyTorch's form (torch_ref = true); NNTrainer's default adds "
                 "epsilon before the bias correction, a difference of epsilon's scale only",
}

SCHEDULER_KEYS = {
    "constant": ("type", "learning_rate"),
    "exponential": ("type", "learning_rate", "decay_rate", "decay_steps"),
    "step": ("type", "learning_rate", "iteration"),
    "cosine": ("type", "max_learning_rate", "min_learning_rate", "decay_steps"),
    "linear": ("type", "max_learning_rate", "min_learning_rate", "decay_steps"),
}

DATASET_KEYS = {"traindata": "train", "validdata": "valid", "testdata": "test"}  # legacy [DataSet]
DATASET_NOTES = {
    "buffersize": "fedpers shuffles the whole data set; no buffer size",
    "buffer_size": "fedpers shuffles the whole data set; no buffer size",
    "labeldata": "NNTrainer ignores it too: labels are inside the data files",
}
SET_SECTIONS = {TRAIN_SET: "train", VALID_SET: "valid", TEST_SET: "test"}

# Loss layers NNTrainer lets a file name as its last section: what fedpers makes of each.
LOSS_LAYERS = {"mse": "mse", "cross": "cross", "cross_softmax": "cross"}
NOT_IMPLEMENTED_LOSSES = ("cross_sigmoid", "kld", "constant_derivative")
# Layer types NNTrainer has and fedpers does not (for a clearer message than "unknown").
NNTRAINER_ONLY_LAYERS = (
    "add", "attention", "backbone_nnstreamer", "backbone_tflite", "cast", "centroid_knn", "channel_shuffle",
    "conv1d", "conv2dtranspose", "cosine", "depthwiseconv2d", "divide", "embedding", "gather", "gru", "grucell",
    "identity", "layer_normalization", "lstm", "lstmcell", "matmul", "mol_attention", "multi_head_attention",
    "multiout", "multiply", "negative", "permute", "positional_encoding", "pow", "preprocess_flip",
    "preprocess_l2norm", "preprocess_translate", "reduce_mean", "reduce_sum", "reshape", "rmsnorm", "rnn",
    "rnncell", "sine", "slice", "split", "sqrt", "subtract", "swiglu", "tangent", "time_dist", "transpose",
    "upsample2d", "weight", "zoneout_lstmcell",
)  # fmt: skip
RETIRED_LAYERS = {"output": "an old NNTrainer name for multiout, which NNTrainer itself no longer registers"}
# Keys NNTrainer takes on any layer that fedpers does not act on.
LAYER_NOTES = {
    "distribute": "time distribution is not implemented: the layer runs once on the whole tensor",
    "shared_from": "weight sharing is not implemented: the layer has its own weights",
    "clip_grad_by_norm": "gradient clipping is not applied here: training differs from NNTrainer",
    "packed": "fedpers keeps every tensor as float32",
    "weight_dtype": "fedpers keeps weights as float32",
    "loss_scale": "mixed-precision loss scaling: fedpers trains in float32",
    "compute_engine": "fedpers computes on the CPU",
    "print": "NNTrainer's debug print",
    "name": "the section name is the layer's name",
}
# Keys fedpers accepts only with the value that means what it does (anything else changes the weights).
DEFAULT_ONLY = {
    "disable_bias": ({"false", "0", "no", "off"}, "fedpers's fully_connected and conv2d always have a bias"),
    "dilation": ({"1", "1,1"}, "fedpers's conv2d has no dilation"),
    "start_dimension": ({"1"}, "fedpers's flatten joins every axis but the batch"),
    "end_dimension": ({"3"}, "fedpers's flatten joins every axis but the batch"),
}
DEFAULT_ONLY_KINDS = {"disable_bias": ("fully_connected", "conv2d"), "dilation": ("conv2d",),
                      "start_dimension": ("flatten",), "end_dimension": ("flatten",)}  # fmt: skip
NOT_IMPLEMENTED_KEYS = {"lora_rank": "LoRA adapters are not implemented", "lora_alpha": "LoRA is not implemented"}

# How keys are spelled when writing (reading is case-insensitive).
SPELLING = {
    "type": "Type",
    "epochs": "Epochs",
    "loss": "Loss",
    "save_path": "Save_Path",
    "learning_rate": "Learning_rate",
    "input_shape": "Input_Shape",
    "unit": "Unit",
    "activation": "Activation",
}
LAYER_FIELD_ORDER = tuple(f.name for f in fields(LayerSpec) if f.name not in ("name", "type"))
FLOAT_FIELDS = ("dropout_rate", "epsilon", "momentum", "weight_regularizer_constant", "weight_decay", "bias_decay")
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


class IniError(ModelError):
    """A ModelError that also knows the line (and file) it comes from."""

    def __init__(
        self, section: str, key: str | None, reason: str, line: int | None = None, source: str | None = None
    ) -> None:
        super().__init__(section, key, reason)
        self.line, self.source = line, source
        if line is not None:
            where = f"{source}:{line}" if source else f"line {line}"
        else:
            where = source or ""
        if where:
            self.args = (f"{where}: {self.args[0]}",)


# ---------------------------------------------------------------- reading: text -> raw sections


@dataclass
class _Entry:
    key: str  # lower case
    value: str  # comments and quotes removed
    line: int


@dataclass
class _Section:
    name: str  # canonical for fixed sections, as written for layers
    line: int
    entries: dict[str, _Entry] = field(default_factory=dict)
    source: str | None = None  # the file it came from (a backbone's sections come from another file)


def _strip_value(raw: str) -> str:
    """Drop an inline '#'/';' comment and surrounding quotes."""
    raw = raw.strip()
    if raw[:1] in ("'", '"'):
        end = raw.find(raw[0], 1)
        if end > 0:
            rest = raw[end + 1 :].strip()
            if not rest or rest[0] in "#;":
                return raw[1:end]
    cut = min((i for i in (raw.find("#"), raw.find(";")) if i >= 0), default=len(raw))
    value = raw[:cut].strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"'):
        value = value[1:-1]
    return value


def _split_sections(text: str, source: str | None) -> list[_Section]:
    sections: list[_Section] = []
    seen: dict[str, _Section] = {}  # lower-cased name -> section
    current: _Section | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            end = line.find("]")
            if end < 0:
                raise IniError(line[1:].strip() or "?", None, "section header without ']'", lineno, source)
            trailing = line[end + 1 :].strip()
            if trailing and trailing[0] not in "#;":
                raise IniError(
                    line[1:end].strip() or "?", None, f"text after section header: {trailing!r}", lineno, source
                )
            name = line[1:end].strip()  # may be empty: only a backbone section may do that (checked later)
            low = name.lower()
            name = FIXED_SECTIONS.get(low, name)
            if low in seen:
                first = seen[low]
                what = "duplicate section" if first.name == name else f"section name clashes with [{first.name}]"
                raise IniError(name, None, f"{what} (first at line {first.line})", lineno, source)
            current = _Section(name, lineno, source=source)
            seen[low] = current
            sections.append(current)
            continue
        if "=" not in line:
            raise IniError(
                current.name if current else "?", None, f"expected 'key = value', got {line!r}", lineno, source
            )
        key, _, value = line.partition("=")
        key = key.strip().lower()
        if current is None:
            raise IniError("?", key, "key outside any section", lineno, source)
        if not key:
            raise IniError(current.name, None, "empty key", lineno, source)
        if key in current.entries:
            first_line = current.entries[key].line
            raise IniError(current.name, key, f"duplicate key (first at line {first_line})", lineno, source)
        current.entries[key] = _Entry(key, _strip_value(value), lineno)
    return sections


# ---------------------------------------------------------------- reading: values


class _BadValue(Exception):
    """Internal: a value did not parse; turned into an IniError with section, key and line."""


def _int(text: str, minimum: int = 1) -> int:
    try:
        v = int(text.strip())
    except ValueError:
        raise _BadValue(f"expected an integer, got {text.strip()!r}") from None
    if v < minimum:
        raise _BadValue(f"must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {v}")
    return v


def _float(text: str) -> float:
    try:
        v = float(text.strip())
    except ValueError:
        raise _BadValue(f"expected a number, got {text.strip()!r}") from None
    if not math.isfinite(v):
        raise _BadValue(f"must be a finite number, got {text.strip()!r}")
    return v


def _nonneg_float(text: str) -> float:
    v = _float(text)
    if v < 0:
        raise _BadValue(f"must not be negative, got {v}")
    return v


def _list(text: str, item: Callable[[str], Any], sep: str = ",") -> tuple[Any, ...]:
    parts = [p.strip() for p in text.split(sep)]
    if any(not p for p in parts):
        raise _BadValue(f"empty item in list {text!r}")
    return tuple(item(p) for p in parts)


def _pair(text: str, minimum: int = 1) -> tuple[int, int]:
    vals = _list(text, lambda s: _int(s, minimum))
    if len(vals) == 1:
        return (vals[0], vals[0])
    if len(vals) != 2:
        raise _BadValue(f"expected one or two integers 'a,b', got {len(vals)} values")
    return vals  # type: ignore[return-value]


def _shape(text: str) -> tuple[int, int, int]:
    """C:H:W; fewer parts are right-aligned as in NNTrainer (784 -> 1:1:784, 28:28 -> 1:28:28)."""
    vals = _list(text, _int, sep=":")
    if len(vals) > 3:
        raise _BadValue(f"expected C:H:W, got {len(vals)} values in {text!r}")
    return (1,) * (3 - len(vals)) + vals  # type: ignore[return-value]


def _padding(text: str) -> str | tuple[int, int]:
    low = text.strip().lower()
    if low in ("same", "valid"):
        return low
    if not low or not (low[0].isdigit() or low[0] in "+-"):
        raise _BadValue(f"expected 'same', 'valid' or 'a,b', got {text.strip()!r}")
    return _pair(text, minimum=0)


def _enum(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        v = text.strip().lower()
        if v not in choices:
            raise _BadValue(f"unknown value {text.strip()!r}; known: {list(choices)}")
        return v

    return parse


def _bool(text: str) -> bool:
    try:
        return BOOL_WORDS[text.strip().lower()]
    except KeyError:
        raise _BadValue(f"expected true or false, got {text.strip()!r}") from None


def _names(text: str) -> tuple[str, ...]:
    names = _list(text, str.strip)
    if len(set(n.lower() for n in names)) != len(names):
        raise _BadValue(f"a layer is listed twice in {text!r}")
    return names


def _text(text: str) -> str:
    if not text:
        raise _BadValue("empty value")
    return text



def _upper_enum(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        v = text.strip().upper()
        if v not in choices:
            raise _BadValue(f"unknown value {text.strip()!r}; known: {list(choices)}")
        return v

    return parse


def _connections(text: str) -> tuple[str, ...]:
    """input_layers: names, each optionally `name(0)` (NNTrainer's output index; fedpers layers have one)."""
    out = []
    for item in _list(text, str.strip):
        name = item
        if item.endswith(")") and "(" in item:
            name, _, idx = item[:-1].partition("(")
            name = name.strip()
            if idx.strip() != "0":
                raise _BadValue(f"{item!r}: fedpers layers have one output, so only index (0) exists")
        out.append(name)
    if len({n.lower() for n in out}) != len(out):
        raise _BadValue(f"a layer is listed twice in {text!r}")
    return tuple(out)


LAYER_PARSERS: dict[str, Callable[[str], Any]] = {
    "input_layers": _connections,
    "trainable": _bool,
    "personal": _bool,
    "input_shape": _shape,
    "unit": _int,
    "filters": _int,
    "kernel_size": _pair,
    "stride": _pair,
    "padding": _padding,
    "pool_size": _pair,
    "pooling": _enum(POOLINGS),
    "activation": _enum(ACTIVATIONS),
    "weight_initializer": _enum(INITIALIZERS),
    "bias_initializer": _enum(INITIALIZERS),
    "dropout_rate": _nonneg_float,
    "epsilon": _nonneg_float,
    "momentum": _nonneg_float,
    "normalization": _bool,
    "standardization": _bool,
    "axis": lambda s: _int(s, 0),
    "weight_regularizer": _enum(REGULARIZERS),
    "weight_regularizer_constant": _nonneg_float,
    "weight_decay": _nonneg_float,
    "bias_decay": _nonneg_float,
    "gamma_initializer": _enum(INITIALIZERS),
    "beta_initializer": _enum(INITIALIZERS),
    "moving_mean_initializer": _enum(INITIALIZERS),
    "moving_variance_initializer": _enum(INITIALIZERS),
}
MODEL_PARSERS: dict[str, Callable[[str], Any]] = {
    "type": _text,
    "epochs": _int,
    "loss": _enum(LOSSES),
    "batch_size": _int,
    "save_path": _text,
    "continue_train": _bool,
    "tensor_format": _upper_enum(TENSOR_FORMATS),
    "model_tensor_type": _upper_enum(MODEL_TENSOR_TYPES),
}
OPTIMIZER_PARSERS: dict[str, Callable[[str], Any]] = {
    "type": _enum(OPTIMIZERS),
    "learning_rate": _nonneg_float,
    "momentum": _nonneg_float,
    "weight_decay": _nonneg_float,
    "beta1": _nonneg_float,
    "beta2": _nonneg_float,
    "epsilon": _nonneg_float,
    "decay_rate": _nonneg_float,
    "decay_steps": _int,
    "torch_ref": _bool,
}
SCHEDULER_PARSERS: dict[str, Callable[[str], Any]] = {
    "type": _enum(SCHEDULERS),
    "decay_rate": _nonneg_float,
    "decay_steps": _int,
    "learning_rate": lambda s: _list(s, _nonneg_float),
    "iteration": lambda s: _list(s, lambda x: _int(x, 0)),
    "max_learning_rate": _nonneg_float,
    "min_learning_rate": _nonneg_float,
}


class _Notes:
    """What a file says that fedpers accepts without acting on it: one line per (key, reason)."""

    def __init__(self) -> None:
        self._where: dict[tuple[str, str], list[str]] = {}

    def add(self, section: str, key: str, reason: str) -> None:
        where = self._where.setdefault((key, reason), [])
        if f"[{section}]" not in where:
            where.append(f"[{section}]")

    def lines(self) -> tuple[str, ...]:
        out = []
        for (key, reason), where in self._where.items():
            shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
            out.append(f"{key} ({shown}): {reason}")
        return tuple(out)


class _Reader:
    """Turns one raw section into typed values, raising IniErrors that point at the line."""

    def __init__(self, section: _Section, notes: _Notes | None = None) -> None:
        self.section, self.source = section, section.source
        self.notes = notes if notes is not None else _Notes()

    def error(self, key: str | None, reason: str) -> IniError:
        entry = self.section.entries.get(key) if key else None
        line = entry.line if entry else self.section.line
        return IniError(self.section.name, key, reason, line, self.source)

    def has(self, key: str) -> bool:
        return key in self.section.entries

    def raw(self, key: str) -> str:
        return self.section.entries[key].value

    def check_keys(self, allowed: tuple[str, ...] | frozenset[str], what: str,
                   noted: dict[str, str] | None = None) -> None:
        """Every key must be `allowed` or `noted` (accepted, recorded as a note)."""
        for key, entry in self.section.entries.items():
            if key in allowed:
                continue
            if noted and key in noted:
                self.note(key, noted[key])
                continue
            known = ", ".join(sorted(allowed))
            raise IniError(self.section.name, key, f"unknown key for {what} (known: {known})", entry.line,
                           self.source)

    def note(self, key: str, reason: str) -> None:
        self.notes.add(self.section.name, key, reason)

    def values(self, parsers: dict[str, Callable[[str], Any]], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, entry in self.section.entries.items():
            if key not in parsers or (keys is not None and key not in keys):
                continue
            try:
                out[key] = parsers[key](entry.value)
            except _BadValue as e:
                raise IniError(self.section.name, key, str(e), entry.line, self.source) from None
        return out

    def build(self, make: Callable[[], Any]) -> Any:
        """Run a spec constructor; its ModelError gets this section's line for the key it names."""
        try:
            return make()
        except IniError:
            raise
        except ModelError as e:
            raise _located(e, self.section) from None


def _ini_key(spec_key: str | None) -> str | None:
    """Spec field name -> INI key (they match except the step scheduler's lists)."""
    return {"learning_rates": "learning_rate", "iterations": "iteration"}.get(spec_key or "", spec_key)


def _located(e: ModelError, section: _Section | None, as_section: str | None = None) -> IniError:
    """A spec-level ModelError, pointed at the line of the key it names (else the section header)."""
    key = _ini_key(e.key)
    line = source = None
    if section is not None:
        entry = section.entries.get(key or "")
        line = entry.line if entry else (section.line or None)
        source = section.source
    return IniError(as_section or e.section, key, e.reason, line, source)


# ---------------------------------------------------------------- reading: the training sections


@dataclass
class _Training:
    """What [Model], [Optimizer], [LearningRateScheduler] and the data sections say, read together
    because NNTrainer lets the optimizer and its schedule come from several places."""

    model: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)


def _read_model(r: _Reader) -> dict[str, Any]:
    r.check_keys(MODEL_KEYS + LEGACY_OPTIMIZER_KEYS, "[Model]", MODEL_NOTES)
    v = r.values(MODEL_PARSERS, MODEL_KEYS)
    kind = v.pop("type", "NeuralNetwork")
    if kind.lower() != "neuralnetwork":
        r.note("type", f"{kind!r}: NNTrainer ignores [Model] Type, and so does fedpers (a neural network)")
    if v.get("continue_train"):
        r.note("continue_train", "kept for NNTrainer; fedpers keeps optimizer state within one Trainer and never "
                                 "reads it from a file")
    if v.get("tensor_format") == "NHWC":
        r.note("tensor_format", "NHWC: fedpers computes in NCHW, and reads data files in NCHW order")
    if v.get("model_tensor_type", "FP32-FP32") != "FP32-FP32":
        r.note("model_tensor_type", f"{v['model_tensor_type']}: fedpers computes and stores in float32")
    return v


def _optimizer(r: _Reader, kind: str, keys: dict[str, Any], what: str) -> tuple[OptimizerSpec, dict[str, Any]]:
    """An OptimizerSpec from parsed keys (decay_rate / decay_steps returned apart: they make a schedule)."""
    allowed = OPTIMIZER_KEYS[kind]
    for key in keys:
        if key not in allowed and key != "optimizer":
            raise r.error(key, f"unknown key for {what} (known: {', '.join(sorted(allowed))})")
    for key in OPTIMIZER_NOTES:
        if key in keys:
            r.note(key, OPTIMIZER_NOTES[key])
    decay = {k: keys[k] for k in ("decay_rate", "decay_steps") if k in keys}
    args = {k: v for k, v in keys.items() if k in OPTIMIZER_PARSERS and k not in ("type", "decay_rate",
                                                                                 "decay_steps", "torch_ref")}
    if "learning_rate" not in args:
        args["learning_rate"] = DEFAULT_LEARNING_RATE[kind]
    return r.build(lambda: OptimizerSpec(type=kind, **args)), decay


def _read_training(fixed: dict[str, _Section], notes: _Notes) -> _Training:
    out = _Training()
    opt_decay: dict[str, Any] = {}
    decay_reader: _Reader | None = None
    has_opt = False
    if MODEL in fixed:
        r = _Reader(fixed[MODEL], notes)
        out.model = _read_model(r)
        legacy = r.values(OPTIMIZER_PARSERS | {"optimizer": _enum(OPTIMIZERS)}, LEGACY_OPTIMIZER_KEYS)
        if "optimizer" in legacy:
            if OPTIMIZER in fixed:
                raise r.error("optimizer", "the optimizer is given twice: here and in [Optimizer] (NNTrainer refuses "
                                           "this too; keep the [Optimizer] section)")
            kind = legacy.pop("optimizer")
            out.optimizer, opt_decay = _optimizer(r, kind, legacy, f"[Model] Optimizer = {kind}")
            decay_reader, has_opt = r, True
        else:
            for key in legacy:
                r.note(key, "NNTrainer reads [Model] optimizer keys only together with [Model] Optimizer; ignored "
                            "(give it in [Optimizer])")
    if OPTIMIZER in fixed:
        r = _Reader(fixed[OPTIMIZER], notes)
        kind = "adam"
        if r.has("type"):
            kind = r.values({"type": OPTIMIZER_PARSERS["type"]})["type"]
        else:
            r.note("type", "no Type: adam, NNTrainer's default")
        keys = r.values(OPTIMIZER_PARSERS)
        unknown = [k for k in r.section.entries if k not in OPTIMIZER_PARSERS]
        if unknown:
            raise r.error(unknown[0], f"unknown key for Type = {kind} (known: {', '.join(OPTIMIZER_KEYS[kind])})")
        keys.pop("type", None)
        out.optimizer, opt_decay = _optimizer(r, kind, keys, f"Type = {kind}")
        decay_reader, has_opt = r, True
    if not has_opt:
        notes.add(MODEL, "optimizer", "no [Optimizer]: NNTrainer would only run inference; fedpers trains with "
                                      f"{out.optimizer.type} at learning rate {out.optimizer.learning_rate}")
    if SCHEDULER in fixed:
        if opt_decay:
            key = next(iter(opt_decay))
            raise decay_reader.error(key, "a learning-rate schedule is given twice: decay keys here and a "
                                          "[LearningRateScheduler] section (NNTrainer refuses this too)")
        opt_has_lr = OPTIMIZER in fixed and "learning_rate" in fixed[OPTIMIZER].entries
        out.optimizer, out.scheduler = _read_scheduler(_Reader(fixed[SCHEDULER], notes), out.optimizer, opt_has_lr)
    elif opt_decay:  # NNTrainer: decay keys on the optimizer make an exponential schedule
        try:
            out.scheduler = SchedulerSpec("exponential", decay_rate=opt_decay.get("decay_rate"),
                                          decay_steps=opt_decay.get("decay_steps"))
        except ModelError as e:
            raise _located(e, decay_reader.section, decay_reader.section.name) from None
    out.dataset = _read_data_sections(fixed, notes)
    return out


def _read_scheduler(r: _Reader, opt: OptimizerSpec, opt_has_lr: bool) -> tuple[OptimizerSpec, SchedulerSpec]:
    """The schedule; a constant / exponential schedule's learning_rate is the optimizer's base rate
    (NNTrainer takes it over [Optimizer]'s, and so does fedpers)."""
    if not r.has("type"):
        raise r.error("type", f"missing Type (one of {list(SCHEDULERS)})")
    kind = r.values({"type": SCHEDULER_PARSERS["type"]})["type"]
    r.check_keys(SCHEDULER_KEYS[kind], f"Type = {kind}")
    v = r.values(SCHEDULER_PARSERS)
    v.pop("type")
    if kind in ("constant", "exponential") and "learning_rate" in v:
        lrs = v.pop("learning_rate")
        if len(lrs) != 1:
            raise r.error("learning_rate", f"a {kind} schedule takes one learning_rate, got {len(lrs)}")
        if opt_has_lr and lrs[0] != opt.learning_rate:
            r.note("learning_rate", f"[Optimizer] Learning_rate = {opt.learning_rate} is ignored: this section's "
                                    f"{lrs[0]} wins, as in NNTrainer")
        opt = r.build(lambda: replace(opt, learning_rate=lrs[0]))
    if "learning_rate" in v:
        v["learning_rates"] = v.pop("learning_rate")
    if "iteration" in v:
        v["iterations"] = v.pop("iteration")
    return opt, r.build(lambda: SchedulerSpec(type=kind, **v))


def _read_data_sections(fixed: dict[str, _Section], notes: _Notes) -> DatasetSpec:
    paths: dict[str, str] = {}
    if DATASET in fixed:
        r = _Reader(fixed[DATASET], notes)
        r.check_keys(tuple(DATASET_KEYS), "[DataSet]", DATASET_NOTES)
        for key, which in DATASET_KEYS.items():
            if r.has(key):
                paths[which] = r.values({key: _text})[key]
    for name, which in SET_SECTIONS.items():
        if name not in fixed:
            continue
        r = _Reader(fixed[name], notes)
        r.check_keys(("type", "path"), f"[{name}]", {"buffer_size": DATASET_NOTES["buffer_size"]})
        kind = r.raw("type").strip().lower() if r.has("type") else ""
        if kind != "file":
            raise r.error("type", f"Type = file is the only data set NNTrainer reads from a model file, got "
                                  f"{kind or 'nothing'!r}")
        if not r.has("path"):
            raise r.error("path", "a file data set needs path = FILE")
        if which in paths:
            r.note("path", f"[{name}] replaces [DataSet]'s {which} file, as in NNTrainer")
        paths[which] = r.values({"path": _text})["path"]
    return DatasetSpec(**paths)


# ---------------------------------------------------------------- reading: layers


def _layer_key_check(r: _Reader, kind: str, first: bool) -> None:
    """Every key of a layer section: a field of this kind, a noted NNTrainer key, or an error."""
    allowed = LAYER_KEYS[kind] | COMMON_KEYS | {"type", "flatten"}
    if first:
        allowed = allowed | {"input_shape"}
    for key, entry in r.section.entries.items():
        if key in allowed:
            continue
        if key in LAYER_NOTES:
            r.note(key, LAYER_NOTES[key])
        elif key in DEFAULT_ONLY and kind in DEFAULT_ONLY_KINDS[key]:
            ok, why = DEFAULT_ONLY[key]
            if entry.value.replace(" ", "").lower() not in ok:
                raise r.error(key, f"{entry.value!r} is not supported: {why}")
        elif key in NOT_IMPLEMENTED_KEYS and kind == "fully_connected":
            raise r.error(key, NOT_IMPLEMENTED_KEYS[key])
        elif key == "input_shape":
            raise r.error(key, "only the first layer may take Input_Shape (a fedpers model has one input)")
        elif key in LAYER_PARSERS:
            raise r.error(key, f"not a key of a {kind} layer (it takes: "
                               f"{', '.join(sorted(LAYER_KEYS[kind] | COMMON_KEYS))})")
        else:
            raise r.error(key, "unknown key")


def _read_layer(r: _Reader, kind: str, index: int, names: dict[str, str]) -> tuple[LayerSpec, Any]:
    """The section's LayerSpec, and the Input_Shape a first non-input layer gives (None otherwise)."""
    _layer_key_check(r, kind, index == 0)
    v = r.values(LAYER_PARSERS)
    name = r.section.name
    implicit = v.pop("input_shape", None) if kind != "input" else None
    if kind == "input":
        if index > 0:
            raise r.error("type", "only the first layer may be an input layer")
        if "input_shape" not in v:
            raise r.error("input_shape", "an input layer needs Input_Shape = C:H:W")
    if "input_layers" in v:
        resolved = []
        for src in v["input_layers"]:
            if src.lower() not in names:
                raise r.error("input_layers", f"{src!r} is not a layer of this model")
            canon = names[src.lower()]
            if canon == name:
                raise r.error("input_layers", "a layer cannot be its own input")
            resolved.append(canon)
        v["input_layers"] = tuple(resolved)
    return r.build(lambda: LayerSpec(name=name, type=kind, **v)), implicit


def _unique(name: str, taken: set[str]) -> str:
    while name.lower() in taken:
        name += "_"
    taken.add(name.lower())
    return name


def _realize(read: list[tuple[LayerSpec, Any]], readers: list[_Reader], taken: set[str]) -> list[LayerSpec]:
    """NNTrainer node properties that make extra layers: Input_Shape on a first layer that is not an
    input (an input layer is put before it) and `flatten = true` (a flatten layer after it)."""
    out: list[LayerSpec] = []
    renamed: dict[str, str] = {}  # layer -> the flatten that now stands for its output
    for i, ((ls, implicit), r) in enumerate(zip(read, readers, strict=True)):
        if ls.input_layers:
            ls = replace(ls, input_layers=tuple(renamed.get(n, n) for n in ls.input_layers))
        if i == 0 and ls.type != "input":
            if implicit is None:
                raise r.error("type", f"the first layer must be an input layer (Type = input, Input_Shape = C:H:W) "
                                      f"or give Input_Shape, not a bare {ls.type}")
            inp = LayerSpec(_unique(f"{ls.name}_input", taken), "input", input_shape=implicit, personal=ls.personal)
            r.note("input_shape", "fedpers puts an input layer before this layer (NNTrainer feeds it directly)")
            out.append(inp)
        out.append(ls)
        if r.has("flatten") and r.values({"flatten": _bool})["flatten"]:
            flat = LayerSpec(_unique(f"{ls.name}_flatten", taken), "flatten", input_layers=(ls.name,),
                             trainable=ls.trainable, personal=ls.personal)
            r.note("flatten", "realized as its own flatten layer after this one, as NNTrainer does")
            renamed[ls.name] = flat.name
            out.append(flat)
    return out


def _layer_kind(r: _Reader) -> str:
    kind = r.raw("type").strip().lower()
    if kind in LAYER_KEYS or kind in LOSS_LAYERS:
        return kind
    if kind in NOT_IMPLEMENTED_LOSSES:
        raise r.error("type", f"the {kind} loss is not implemented in fedpers (it has cross with softmax, and mse)")
    why = ""
    if kind in NNTRAINER_ONLY_LAYERS:
        why = " (an NNTrainer layer fedpers does not implement)"
    elif kind in RETIRED_LAYERS:
        why = f" ({RETIRED_LAYERS[kind]})"
    raise r.error("type", f"unknown layer type {kind!r}{why}; known: {sorted(LAYER_KEYS)}")


def _base_dir(source: str | None) -> Path:
    return Path(source).resolve().parent if source and Path(source).is_file() else Path.cwd()


def _expand_backbones(layers: list[_Section], notes: _Notes, seen: tuple[str, ...]) -> list[_Section]:
    """Sections with `backbone = FILE.ini` are replaced by that file's layer sections (its training
    sections are not read), each with the backbone section's `trainable` (default true), as NNTrainer
    does; other backbones (TFLite, NNStreamer) are refused."""
    out: list[_Section] = []
    for s in layers:
        if "backbone" not in s.entries:
            if not s.name:
                raise IniError("", None, "empty section name", s.line, s.source)
            out.append(s)
            continue
        r = _Reader(s, notes)
        target = r.raw("backbone").strip()
        if not target.lower().endswith(".ini"):
            raise r.error("backbone", f"{target!r}: fedpers reads only .ini backbones (TFLite and NNStreamer "
                                      "backbones are NNTrainer's)")
        path = (_base_dir(s.source) / target).resolve()
        if str(path) in seen:
            raise r.error("backbone", f"{target!r} includes itself")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise r.error("backbone", f"cannot read {path}: {e.strerror or e}") from None
        trainable = r.values({"trainable": _bool}).get("trainable", True)
        for key in s.entries:
            if key not in ("backbone", "trainable"):
                r.note(key, "NNTrainer ignores this key on an .ini backbone section, and so does fedpers")
        inner = [t for t in _split_sections(text, str(path)) if t.name not in FIXED_SECTIONS.values()]
        for t in _expand_backbones(inner, notes, (*seen, str(path))):
            t.entries["trainable"] = _Entry("trainable", "true" if trainable else "false", s.line)
            out.append(t)
    return out


def parse_ini(text: str, source: str | None = None) -> ModelSpec:
    """Parse NNTrainer INI text into a ModelSpec; every problem is a ModelError (an IniError). With a
    `source` path, backbone files are found next to it (else in the working directory)."""
    sections = _split_sections(text, source)
    notes = _Notes()
    fixed = {s.name: s for s in sections if s.name in FIXED_SECTIONS.values()}
    layers = _expand_backbones([s for s in sections if s.name not in FIXED_SECTIONS.values()], notes,
                               (str(Path(source).resolve()),) if source else ())
    training = _read_training(fixed, notes)
    if not layers:
        line = fixed[MODEL].line if MODEL in fixed else None
        raise IniError(MODEL, None, "no layer sections: a model needs at least an input layer", line, source)
    seen: dict[str, _Section] = {}
    for s in layers:
        if s.name.lower() in seen:
            raise IniError(s.name, None, f"duplicate layer name (first in {seen[s.name.lower()].source or 'the file'}"
                                         f" at line {seen[s.name.lower()].line})", s.line, s.source)
        seen[s.name.lower()] = s
    readers = [_Reader(s, notes) for s in layers]
    for r in readers:
        if not r.has("type"):
            raise r.error("type", f"missing Type (a layer type: {sorted(LAYER_KEYS)})")
    kinds = [_layer_kind(r) for r in readers]
    loss = training.model.get("loss")
    if kinds[-1] in LOSS_LAYERS:  # a loss layer section: the model's loss, not a layer here
        r = readers[-1]
        if len(kinds) == 1:
            raise r.error("type", "a loss layer needs a layer before it")
        r.check_keys(("type", "input_layers", "trainable"), f"a {kinds[-1]} loss layer", LAYER_NOTES)
        srcs = r.values({"input_layers": _connections}).get("input_layers", (layers[-2].name,))
        if [n.lower() for n in srcs] != [layers[-2].name.lower()]:
            raise r.error("input_layers", f"a loss layer must take the layer before it ({layers[-2].name!r})")
        if loss is not None and loss != LOSS_LAYERS[kinds[-1]]:
            notes.add(MODEL, "loss", f"{loss} is ignored: the loss layer [{layers[-1].name}] sets it, as in NNTrainer")
        training.model["loss"] = LOSS_LAYERS[kinds[-1]]
        layers, readers, kinds = layers[:-1], readers[:-1], kinds[:-1]
    for r, kind in zip(readers, kinds, strict=True):
        if kind in LOSS_LAYERS:
            raise r.error("type", "a loss layer must be the last section")
    names = {s.name.lower(): s.name for s in layers}
    specs = [_read_layer(r, kind, i, names) for i, (r, kind) in enumerate(zip(readers, kinds, strict=True))]
    specs = _realize(specs, readers, set(names))
    try:
        return ModelSpec(layers=tuple(specs), optimizer=training.optimizer, scheduler=training.scheduler,
                         dataset=training.dataset, notes=notes.lines(), **training.model)
    except ModelError as e:
        where = {s.name: s for s in sections} | {s.name: s for s in layers}
        raise _located(e, where.get(e.section)) from None


def load_ini(path: str | os.PathLike[str]) -> ModelSpec:
    """Read and parse an INI model file; errors name the file and line (a missing file, a directory or a
    binary file given as the model is an IniError too, naming what it is)."""
    source = os.fspath(path)
    if os.path.isdir(source):
        raise IniError("", None, "is a directory, not a model file (expected MODEL.ini)", source=source)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise IniError("", None, "no such model file", source=source) from None
    except OSError as exc:
        raise IniError("", None, f"cannot be read ({exc.strerror})", source=source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        kind = "an .npz archive (data or weights?)" if raw.startswith(b"PK") else "binary, not UTF-8 text"
        raise IniError("", None, f"is {kind}: a model file is NNTrainer-style INI text", source=source) from None
    return parse_ini(text, source=source)


# ---------------------------------------------------------------- writing: ModelSpec -> text


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def _line(key: str, value: Any) -> str:
    return f"{SPELLING.get(key, key)} = {_fmt(value)}"


def _unwritable(section: str, spec: Any, keys: tuple[str, ...], kind: str) -> None:
    """Refuse a spec whose non-default fields the INI form for its type has no key for (no silent loss)."""
    for f in fields(spec):
        if f.name == "type":
            continue
        if _ini_key(f.name) not in keys and getattr(spec, f.name) != f.default:
            raise ModelError(section, f.name, f"a {kind} {section.lower()} does not use {f.name}; cannot write it")


def _path_line(section: str, key: str, spelled: str, path: str) -> str:
    if any(c in path for c in '"\n\r') or not path:
        raise ModelError(section, key, "cannot write a path that is empty or holds quotes or newlines")
    return f'{spelled} = "{path}"'


def to_ini(spec: ModelSpec) -> str:
    """Write a ModelSpec as INI text NNTrainer reads; parse_ini(to_ini(spec)) == spec. fedpers-only
    keys (an sgd momentum, an optimizer weight_decay, `personal`) are written only when set;
    `nntrainer_ini` leaves them out for NNTrainer."""
    out = ["# fedpers model (NNTrainer INI)", f"[{MODEL}]", "Type = NeuralNetwork"]
    out += [_line("epochs", spec.epochs), _line("loss", spec.loss), _line("batch_size", spec.batch_size)]
    if spec.save_path is not None:
        out.append(_path_line(MODEL, "save_path", "Save_Path", spec.save_path))
    if spec.continue_train:
        out.append(_line("continue_train", True))
    if spec.tensor_format != "NCHW":
        out.append(_line("tensor_format", spec.tensor_format))
    if spec.model_tensor_type != "FP32-FP32":
        out.append(_line("model_tensor_type", spec.model_tensor_type))

    opt, sch = spec.optimizer, spec.scheduler
    opt_keys = tuple(k for k in OPTIMIZER_KEYS[opt.type] if k not in ("decay_rate", "decay_steps", "torch_ref"))
    _unwritable(OPTIMIZER, opt, opt_keys, opt.type)
    lr_in_schedule = sch.type == "exponential"
    out += ["", f"[{OPTIMIZER}]", _line("type", opt.type)]
    defaults = OptimizerSpec()
    for k in opt_keys[1:]:
        if k == "learning_rate" and lr_in_schedule:
            continue
        if k in FEDPERS_OPTIMIZER_KEYS and getattr(opt, k) == getattr(defaults, k):
            continue
        out.append(_line(k, getattr(opt, k)))

    _unwritable(SCHEDULER, sch, SCHEDULER_KEYS[sch.type], sch.type)
    if sch != SchedulerSpec():
        out += ["", f"[{SCHEDULER}]", _line("type", sch.type)]
        if sch.type == "exponential":
            out += [_line("learning_rate", opt.learning_rate), _line("decay_rate", sch.decay_rate),
                    _line("decay_steps", sch.decay_steps)]
        elif sch.type == "step":
            out.append("learning_rate = " + ", ".join(_fmt(float(x)) for x in sch.learning_rates))
            out.append("iteration = " + ", ".join(_fmt(x) for x in sch.iterations))
        else:
            out += [_line("max_learning_rate", sch.max_learning_rate),
                    _line("min_learning_rate", sch.min_learning_rate), _line("decay_steps", sch.decay_steps)]

    for section, which in SET_SECTIONS.items():
        path = getattr(spec.dataset, which)
        if path is not None:
            out += ["", f"[{section}]", "type = file", _path_line(section, "path", "path", path)]

    seen: dict[str, str] = {}
    for layer in spec.layers:
        if layer.name.lower() in seen:  # INI section names and references ignore case
            raise ModelError(layer.name, None, f"differs from layer {seen[layer.name.lower()]!r} only in case")
        seen[layer.name.lower()] = layer.name
    for layer in spec.layers:
        out += ["", f"[{layer.name}]", _line("type", layer.type)]
        for key in LAYER_FIELD_ORDER:
            value = getattr(layer, key)
            default = LayerSpec.__dataclass_fields__[key].default
            if value == default:
                continue
            if key == "input_layers":
                out.append("input_layers = " + ", ".join(value))
            elif key == "input_shape":
                out.append("Input_Shape = " + ":".join(str(v) for v in value))
            elif key in FLOAT_FIELDS:
                out.append(_line(key, float(value)))
            else:
                out.append(_line(key, value))
    return "\n".join(out) + "\n"


def nntrainer_ini(spec: ModelSpec) -> tuple[str, tuple[str, ...]]:
    """INI text for NNTrainer itself, and what it leaves out. The optimizer's weight_decay becomes each
    weighted layer's weight_decay / bias_decay (the same L2 term, in NNTrainer's place for it);
    `personal` and an sgd momentum have no NNTrainer key and are left out (named in the result)."""
    left: list[str] = []
    opt = spec.optimizer
    wd = opt.weight_decay
    layers = []
    for ls in spec.layers:
        changes: dict[str, Any] = {}
        if ls.personal:
            changes["personal"] = False
        if wd and ls.type in ("fully_connected", "conv2d", "batch_normalization"):
            changes["weight_decay"] = (ls.weight_decay or 0.0) + wd
            changes["bias_decay"] = (ls.bias_decay or 0.0) + wd
        layers.append(replace(ls, **changes) if changes else ls)
    personal = [ls.name for ls in spec.layers if ls.personal]
    if personal:
        left.append(f"personal = true on {', '.join(personal)} (NNTrainer has no personal layers)")
    if opt.momentum:
        left.append(f"sgd momentum = {opt.momentum} (NNTrainer's sgd has none)")
    out = replace(spec, layers=tuple(layers), optimizer=replace(opt, momentum=0.0, weight_decay=0.0))
    return to_ini(out), tuple(left)


def save_ini(spec: ModelSpec, path: str | os.PathLike[str]) -> None:
    """Write `spec` to `path` atomically (store.atomic_write_bytes: temp file, fsync, rename): a reader
    or a crash sees the old file or the new one, never half of one, and no temp file is left."""
    from ..store import atomic_write_bytes  # here, not at the top: reading INI files stays numpy-free

    atomic_write_bytes(path, to_ini(spec).encode("utf-8"))
