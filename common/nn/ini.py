"""NNTrainer-style INI model files <-> ModelSpec.

The text is parsed once, here, into the frozen records of `spec.py`; nothing downstream sees strings.
Like NNTrainer, keys and the fixed section names ([Model], [Optimizer], [LearningRateScheduler]) are
case-insensitive, and so are enum values; layer section names keep their case. A small hand parser
(not configparser) gives ordered sections, duplicate detection and an error that names the line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from .spec import (
    ACTIVATIONS,
    COMMON_KEYS,
    INITIALIZERS,
    LAYER_KEYS,
    LOSSES,
    OPTIMIZERS,
    POOLINGS,
    REGULARIZERS,
    SCHEDULERS,
    LayerSpec,
    ModelError,
    ModelSpec,
    OptimizerSpec,
    SchedulerSpec,
)

__all__ = ["IniError", "load_ini", "parse_ini", "save_ini", "to_ini"]

MODEL, OPTIMIZER, SCHEDULER = "Model", "Optimizer", "LearningRateScheduler"
FIXED_SECTIONS = {s.lower(): s for s in (MODEL, OPTIMIZER, SCHEDULER)}
# NNTrainer sections fedpers does not read: data comes from Trainer.fit / --data instead.
UNSUPPORTED_SECTIONS = ("dataset",)

MODEL_KEYS = ("type", "epochs", "loss", "batch_size", "save_path")
OPTIMIZER_KEYS = {
    "sgd": ("type", "learning_rate", "momentum", "weight_decay"),
    "adam": ("type", "learning_rate", "weight_decay", "beta1", "beta2", "epsilon"),
}
SCHEDULER_KEYS = {
    "constant": ("type",),
    "exponential": ("type", "decay_rate", "decay_steps"),
    "step": ("type", "learning_rate", "iteration"),
}
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
            name = line[1:end].strip()
            if not name:
                raise IniError("?", None, "empty section name", lineno, source)
            low = name.lower()
            if low in UNSUPPORTED_SECTIONS:
                raise IniError(
                    name, None, "dataset sections are not read; pass data to Trainer.fit (or --data)", lineno, source
                )
            name = FIXED_SECTIONS.get(low, name)
            if low in seen:
                first = seen[low]
                what = "duplicate section" if first.name == name else f"section name clashes with [{first.name}]"
                raise IniError(name, None, f"{what} (first at line {first.line})", lineno, source)
            current = _Section(name, lineno)
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


LAYER_PARSERS: dict[str, Callable[[str], Any]] = {
    "input_layers": _names,
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
    "type": _enum(("neuralnetwork",)),
    "epochs": _int,
    "loss": _enum(LOSSES),
    "batch_size": _int,
    "save_path": _text,
}
OPTIMIZER_PARSERS: dict[str, Callable[[str], Any]] = {
    "type": _enum(OPTIMIZERS),
    "learning_rate": _nonneg_float,
    "momentum": _nonneg_float,
    "weight_decay": _nonneg_float,
    "beta1": _nonneg_float,
    "beta2": _nonneg_float,
    "epsilon": _nonneg_float,
}
SCHEDULER_PARSERS: dict[str, Callable[[str], Any]] = {
    "type": _enum(SCHEDULERS),
    "decay_rate": _nonneg_float,
    "decay_steps": _int,
    "learning_rate": lambda s: _list(s, _nonneg_float),
    "iteration": lambda s: _list(s, _int),
}


class _Reader:
    """Turns one raw section into typed values, raising IniErrors that point at the line."""

    def __init__(self, section: _Section, source: str | None) -> None:
        self.section, self.source = section, source

    def error(self, key: str | None, reason: str) -> IniError:
        entry = self.section.entries.get(key) if key else None
        line = entry.line if entry else self.section.line
        return IniError(self.section.name, key, reason, line, self.source)

    def check_keys(self, allowed: tuple[str, ...] | frozenset[str], what: str) -> None:
        for key, entry in self.section.entries.items():
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise IniError(
                    self.section.name, key, f"unknown key for {what} (known: {known})", entry.line, self.source
                )

    def values(self, parsers: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, entry in self.section.entries.items():
            if key not in parsers:
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
            raise _located(e, self.section, self.source) from None


def _ini_key(spec_key: str | None) -> str | None:
    """Spec field name -> INI key (they match except the step scheduler's lists)."""
    return {"learning_rates": "learning_rate", "iterations": "iteration"}.get(spec_key or "", spec_key)


def _located(e: ModelError, section: _Section | None, source: str | None) -> IniError:
    """A spec-level ModelError, pointed at the line of the key it names (else the section header)."""
    key = _ini_key(e.key)
    line = None
    if section is not None:
        entry = section.entries.get(key or "")
        line = entry.line if entry else (section.line or None)
    return IniError(e.section, key, e.reason, line, source)


def _read_model(r: _Reader) -> dict[str, Any]:
    r.check_keys(MODEL_KEYS, "[Model]")
    v = r.values(MODEL_PARSERS)
    v.pop("type", None)
    return v


def _read_optimizer(r: _Reader) -> OptimizerSpec:
    if "type" not in r.section.entries:
        raise r.error("type", f"missing Type (one of {list(OPTIMIZERS)})")
    kind = r.values({"type": OPTIMIZER_PARSERS["type"]})["type"]
    r.check_keys(OPTIMIZER_KEYS[kind], f"Type = {kind}")
    return r.build(lambda: OptimizerSpec(**r.values(OPTIMIZER_PARSERS)))


def _read_scheduler(r: _Reader) -> SchedulerSpec:
    if "type" not in r.section.entries:
        raise r.error("type", f"missing Type (one of {list(SCHEDULERS)})")
    kind = r.values({"type": SCHEDULER_PARSERS["type"]})["type"]
    r.check_keys(SCHEDULER_KEYS[kind], f"Type = {kind}")
    v = r.values(SCHEDULER_PARSERS)
    if "learning_rate" in v:
        v["learning_rates"] = v.pop("learning_rate")
    if "iteration" in v:
        v["iterations"] = v.pop("iteration")
    return r.build(lambda: SchedulerSpec(**v))


def _read_layer(r: _Reader, index: int, names: dict[str, str]) -> LayerSpec:
    if "type" not in r.section.entries:
        raise r.error("type", f"missing Type (a layer type: {sorted(LAYER_KEYS)})")
    kind = r.section.entries["type"].value.strip().lower()
    if kind not in LAYER_KEYS:
        raise r.error("type", f"unknown layer type {kind!r}; known: {sorted(LAYER_KEYS)}")
    allowed = LAYER_KEYS[kind] | COMMON_KEYS | {"type"}
    for key, entry in r.section.entries.items():
        if key not in allowed:
            if key in LAYER_PARSERS:
                reason = f"not a key of a {kind} layer (it takes: {', '.join(sorted(allowed - {'type'}))})"
            else:
                reason = "unknown key"
            raise IniError(r.section.name, key, reason, entry.line, r.source)
    v = r.values(LAYER_PARSERS)
    name = r.section.name
    if index == 0 and kind != "input":
        raise r.error("type", f"the first layer must be an input layer (Type = input, Input_Shape = C:H:W), not {kind}")
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
    return r.build(lambda: LayerSpec(name=name, type=kind, **v))


def parse_ini(text: str, source: str | None = None) -> ModelSpec:
    """Parse NNTrainer-style INI text into a ModelSpec; every problem is a ModelError (an IniError)."""
    sections = _split_sections(text, source)
    fixed = {s.name: s for s in sections if s.name in FIXED_SECTIONS.values()}
    layers = [s for s in sections if s.name not in FIXED_SECTIONS.values()]
    model = _read_model(_Reader(fixed[MODEL], source)) if MODEL in fixed else {}
    optimizer = _read_optimizer(_Reader(fixed[OPTIMIZER], source)) if OPTIMIZER in fixed else OptimizerSpec()
    scheduler = _read_scheduler(_Reader(fixed[SCHEDULER], source)) if SCHEDULER in fixed else SchedulerSpec()
    if not layers:
        line = fixed[MODEL].line if MODEL in fixed else None
        raise IniError(MODEL, None, "no layer sections: a model needs at least an input layer", line, source)
    names = {s.name.lower(): s.name for s in layers}
    specs = [_read_layer(_Reader(s, source), i, names) for i, s in enumerate(layers)]
    try:
        return ModelSpec(layers=tuple(specs), optimizer=optimizer, scheduler=scheduler, **model)
    except ModelError as e:
        where = {s.name: s for s in sections}.get(e.section)
        raise _located(e, where, source) from None


def load_ini(path: str | os.PathLike[str]) -> ModelSpec:
    """Read and parse an INI model file; errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        return parse_ini(f.read(), source=os.fspath(path))


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


def to_ini(spec: ModelSpec) -> str:
    """Write a ModelSpec as NNTrainer-style INI text; parse_ini(to_ini(spec)) == spec."""
    out = ["# fedpers model (NNTrainer-style INI)", f"[{MODEL}]", "Type = NeuralNetwork"]
    out += [_line("epochs", spec.epochs), _line("loss", spec.loss), _line("batch_size", spec.batch_size)]
    if spec.save_path is not None:
        if any(c in spec.save_path for c in '"\n\r') or not spec.save_path:
            raise ModelError(MODEL, "save_path", "cannot write a path that is empty or holds quotes or newlines")
        out.append(f'Save_Path = "{spec.save_path}"')

    opt = spec.optimizer
    _unwritable(OPTIMIZER, opt, OPTIMIZER_KEYS[opt.type], opt.type)
    out += ["", f"[{OPTIMIZER}]"]
    out += [_line(k, getattr(opt, k)) for k in OPTIMIZER_KEYS[opt.type]]

    sch = spec.scheduler
    _unwritable(SCHEDULER, sch, SCHEDULER_KEYS[sch.type], sch.type)
    if sch != SchedulerSpec():
        out += ["", f"[{SCHEDULER}]", _line("type", sch.type)]
        if sch.type == "exponential":
            out += [_line("decay_rate", sch.decay_rate), _line("decay_steps", sch.decay_steps)]
        elif sch.type == "step":
            out.append("learning_rate = " + ", ".join(_fmt(float(x)) for x in sch.learning_rates))
            out.append("iteration = " + ", ".join(_fmt(x) for x in sch.iterations))

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
            elif key in ("dropout_rate", "epsilon", "momentum", "weight_regularizer_constant", "weight_decay",
                         "bias_decay"):
                out.append(_line(key, float(value)))
            else:
                out.append(_line(key, value))
    return "\n".join(out) + "\n"


def save_ini(spec: ModelSpec, path: str | os.PathLike[str]) -> None:
    """Write `spec` to `path` atomically (store.atomic_write_bytes: temp file, fsync, rename): a reader
    or a crash sees the old file or the new one, never half of one, and no temp file is left."""
    from ..store import atomic_write_bytes  # here, not at the top: reading INI files stays numpy-free

    atomic_write_bytes(path, to_ini(spec).encode("utf-8"))
