"""Personalization methods as data, shared by the server and the device.

A method says which layers stay on the device (their tensors never reach the server), whether the
device also keeps a whole personal model beside the shared one (Ditto), which of its candidate
models it serves, and its typed hyperparameters with defaults and valid ranges. The server uses
`Method.split` to know which tensors an update carries; the device runs the method's round
procedure (`fedpers.client.methods`). Pure Python (no numpy, numba or gRPC), so the server, the
device and the wire code can all import it.

| name    | paper                                 | stays on the device          | shared            |
| ------- | ------------------------------------- | ---------------------------- | ----------------- |
| fedavg  | McMahan et al. 2017 (+ fine-tune)     | nothing                      | every trainable   |
| fedprox | Li et al. 2020 (FedProx)              | nothing                      | every trainable   |
| fedper  | Arivazhagan et al. 2019               | the head                     | the body          |
| fedrep  | Collins et al. 2021                   | the head                     | the body          |
| ditto   | Li, Hu, Beirami, Smith 2021           | a whole personal model       | every trainable   |
| fedbn   | Li, Jiang et al. 2021 (FedBN)         | batch-norm layers            | all but BN        |

The head is the layers the model marks `personal = true`, else its last layer with weights
(`head_depth` = n picks the last n layers with weights instead). FedProx's proximal term
(`mu`) applies to the shared part of every method, so e.g. FedRep + mu is FedRep with FedProx.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

WEIGHTED_TYPES = frozenset({"fully_connected", "conv2d", "batch_normalization"})
PERSONAL_PREFIX = "personal/"  # Ditto's personal model on the device: "personal/<weight>", never shared
CANDIDATES = ("global", "finetuned", "personal", "local_only")  # what a device may serve at the end
LOCAL_ONLY = "local_only"  # the model a device trains on its own data alone: the reference it must not fall below
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")  # method names: what --personalization and the wire accept
PROCEDURES = ("joint", "alternating", "ditto")  # the device round procedures (fedpers.client.methods.ROUNDS)


class MethodError(ValueError):
    """Unknown method or hyperparameter, or a value out of its range; the message names it."""


class LayerInfo(Protocol):
    """What a method needs to know of a layer (fedpers.nn.LayerSpec satisfies it)."""

    name: str
    type: str
    personal: bool
    trainable: bool


class WeightInfo(Protocol):
    """What a method needs to know of a weight (fedpers.nn.WeightSpec satisfies it)."""

    name: str
    layer: str
    trainable: bool  # changed by local training (its layer trains)


class Keep(enum.Enum):
    """Which layers stay on the device."""

    NONE = "none"
    HEAD = "head"
    BATCH_NORM = "batch_norm"


@dataclass(frozen=True)
class Param:
    """One typed hyperparameter: default, inclusive range (numbers) or choices (strings)."""

    name: str
    default: float | int | str
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> float | int | str:
        """`value` converted to this parameter's type and checked against its range or choices."""
        kind = type(self.default)
        try:
            if kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                v: float | int | str = int(value)
            elif kind is float:
                v = float(value)
            else:
                v = str(value)
        except (TypeError, ValueError):
            raise MethodError(f"{self.name} must be {kind.__name__}, got {value!r}") from None
        if isinstance(v, str):
            if self.choices and v not in self.choices:
                raise MethodError(f"{self.name} must be one of {list(self.choices)}, got {v!r}")
            return v
        if v != v or (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
            raise MethodError(f"{self.name} must be in [{self.low}, {self.high}], got {v}")
        return v


@dataclass(frozen=True)
class Hyperparams:
    """Every method's knobs in one typed record; `Method.hyperparams` fills and checks the ones its
    method uses (the rest keep these neutral values). See PARAMS for each field's meaning and range."""

    method: str
    mu: float = 0.0
    lam: float = 0.0
    personal_epochs: int = 1
    head_epochs: int = 1
    body_epochs: int = 1
    head_depth: int = 0
    ft_epochs: int = 0
    ft_scope: str = "all"
    val_fraction: float = 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        """The values by name (method included), e.g. for a report or the wire."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _p(name: str, default: float | int | str, doc: str, low: float | None = None, high: float | None = None,
       choices: tuple[str, ...] = ()) -> Param:
    return Param(name, default, doc, low, high, choices)


# Every parameter with its range; a method lists the ones it uses, possibly with its own default.
PARAMS: dict[str, Param] = {p.name: p for p in (
    _p("mu", 0.0, "FedProx: proximal coefficient mu/2·||w - w_global||² on the shared part while training it",
       0.0, 10.0),
    _p("lam", 0.1, "Ditto: lambda of the personal model's proximal term towards the round's global model",
       0.0, 100.0),
    _p("personal_epochs", 2, "Ditto: epochs of personal-model training per round", 1, 100),
    _p("head_epochs", 4, "FedRep: epochs of head training (body frozen) per round, and once more at the end",
       1, 100),
    _p("body_epochs", 2, "FedRep: epochs of body training (head frozen) per round", 1, 100),
    _p("head_depth", 0, "the head: 0 = layers marked personal, else the last layer with weights; n = the last "
       "n layers with weights", 0, 64),
    _p("ft_epochs", 5, "epochs of fine-tuning at the end of the federation (0: no fine-tuned candidate)", 0, 100),
    _p("ft_scope", "all", "what fine-tuning trains: all layers, or the head only", choices=("all", "head")),
    _p("val_fraction", 0.2, "share of the device's training data held out to choose what it serves "
       "(0: no choice, the method's own model is served)", 0.0, 0.5),
)}
COMMON = ("mu", "val_fraction")  # every method takes these


@dataclass(frozen=True)
class TensorSplit:
    """How one method splits one model's tensors between the server and the device."""

    shared: tuple[str, ...]  # trainable tensors of non-local layers: exactly what an update carries (sorted)
    served: tuple[str, ...]  # what the server sends: shared + non-trainable tensors of non-local layers
    local: tuple[str, ...]  # tensors of the local layers: never leave the device
    local_layers: tuple[str, ...]
    personal_model: bool  # the device also keeps a whole personal model (names under PERSONAL_PREFIX)


@dataclass(frozen=True)
class Method:
    """One personalization method: what it keeps on the device, what it serves, its knobs."""

    name: str
    title: str
    paper: str
    summary: str
    keeps: Keep
    personal_model: bool  # keeps a whole personal model besides the shared one (Ditto)
    serves: str  # the candidate served when there is no per-device choice
    candidates: tuple[str, ...]  # what the device can serve at the end (besides local_only)
    params: tuple[Param, ...]
    # What a round does on the device (fedpers.client.methods.ROUNDS): "joint" (every layer trains together),
    # "alternating" (FedRep: head, then body), "ditto" (the shared model, then the personal one)
    procedure: str = "joint"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise MethodError(f"{self.name} has no hyperparameter {name!r}; it has {[p.name for p in self.params]}")

    def hyperparams(self, values: Mapping[str, Any] | None = None, **more: Any) -> Hyperparams:
        """This method's defaults overridden by `values` / keywords, each checked; unknown names refused."""
        given = {**(values or {}), **more}
        other = given.pop("method", self.name)
        if other != self.name:
            self._wrong(other)
        out = {p.name: p.default for p in self.params}
        for k, v in given.items():
            out[k] = self.param(k).check(v)
        return Hyperparams(method=self.name, **out)

    def parse(self, text: str) -> Hyperparams:
        """Hyperparameters from 'name=value,name=value' (a CLI flag); '' gives the defaults."""
        pairs: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise MethodError(f"hyperparameters are name=value pairs separated by commas, got {item!r}")
            pairs[key.strip()] = value.strip()
        return self.hyperparams(pairs)

    def _wrong(self, other: str) -> None:
        raise MethodError(f"hyperparameters of {other!r} given to {self.name!r}")

    def _check(self, hp: Hyperparams) -> None:
        if hp.method != self.name:
            self._wrong(hp.method)

    def local_layers(self, layers: Sequence[LayerInfo], hp: Hyperparams) -> tuple[str, ...]:
        """The layers whose tensors stay on the device, in model order."""
        self._check(hp)
        if self.keeps is Keep.HEAD:
            return head_layers(layers, hp.head_depth)
        if self.keeps is Keep.BATCH_NORM:
            bn = tuple(ls.name for ls in layers if ls.type == "batch_normalization")
            if not bn:
                raise MethodError(f"{self.name} keeps batch-norm layers on the device, but the model has none")
            return bn
        return ()

    def split(self, weights: Iterable[WeightInfo], layers: Sequence[LayerInfo], hp: Hyperparams) -> TensorSplit:
        """Shared / served / local tensor names for this model (weights as fedpers.nn.weight_specs gives them)."""
        local_layers = self.local_layers(layers, hp)
        keep = set(local_layers)
        ws = list(weights)
        shared = tuple(sorted(w.name for w in ws if w.layer not in keep and w.trainable))
        if not shared:
            raise MethodError(f"{self.name}: no shared trainable tensors are left: nothing to federate")
        return TensorSplit(
            shared=shared,
            served=tuple(sorted(w.name for w in ws if w.layer not in keep)),
            local=tuple(sorted(w.name for w in ws if w.layer in keep)),
            local_layers=local_layers,
            personal_model=self.personal_model,
        )


def head_layers(layers: Sequence[LayerInfo], depth: int = 0) -> tuple[str, ...]:
    """The head: layers marked personal (depth 0, when any), else the last `depth` (at least 1) layers with
    weights, in model order."""
    if depth == 0:
        marked = tuple(ls.name for ls in layers if ls.personal)
        if marked:
            return marked
    weighted = [ls.name for ls in layers if ls.type in WEIGHTED_TYPES]
    n = max(depth, 1)
    if n >= len(weighted):
        raise MethodError(f"a head of {n} layers with weights leaves no body to share (the model has {len(weighted)})")
    return tuple(weighted[-n:])


def define_method(name: str, title: str, paper: str, summary: str, keeps: Keep, serves: str,
                  candidates: tuple[str, ...], params: tuple[str, ...] = (), personal_model: bool = False,
                  procedure: str = "joint", **defaults: float | int | str) -> Method:
    """A Method from PARAMS names (`mu` and `val_fraction` are always added) with its own defaults;
    MethodError when a name, default, candidate or procedure does not fit."""
    if not NAME_PATTERN.fullmatch(name):
        raise MethodError(f"a method name is 1-32 of a-z 0-9 _ starting with a letter, got {name!r}")
    unknown = sorted((set(params) | set(defaults)) - set(PARAMS))
    if unknown:
        raise MethodError(f"{name}: unknown hyperparameters {unknown}; known: {sorted(PARAMS)}")
    if not set(defaults) <= {*params, *COMMON}:
        raise MethodError(f"{name}: defaults for hyperparameters it does not take: "
                          f"{sorted(set(defaults) - {*params, *COMMON})}")
    if not candidates or not set(candidates) <= set(CANDIDATES) - {"local_only"} or serves not in candidates:
        raise MethodError(f"{name}: candidates must be among {list(CANDIDATES[:3])} and include serves={serves!r}")
    if procedure not in PROCEDURES:
        raise MethodError(f"{name}: procedure must be one of {list(PROCEDURES)}, got {procedure!r}")
    ps = tuple(replace(PARAMS[p], default=PARAMS[p].check(defaults[p])) if p in defaults else PARAMS[p]
               for p in dict.fromkeys((*params, *COMMON)))
    return Method(name, title, paper, summary, keeps, personal_model, serves, candidates, ps, procedure)


_FT = ("ft_epochs", "ft_scope", "head_depth")
METHODS: dict[str, Method] = {m.name: m for m in (
    define_method("fedavg", "FedAvg", "McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from "
            "Decentralized Data", "one global model, every trainable tensor shared; optionally fine-tuned on the "
            "device at the end (all layers or the head)", Keep.NONE, "global", ("global", "finetuned"), _FT),
    define_method("fedprox", "FedProx", "Li et al. 2020, Federated Optimization in Heterogeneous Networks",
            "FedAvg whose local training adds mu/2·||w - w_global||² (mu > 0)", Keep.NONE, "global",
            ("global", "finetuned"), _FT, mu=0.01),
    define_method("fedper", "FedPer", "Arivazhagan et al. 2019, Federated Learning with Personalization Layers",
            "the head stays on the device and trains with the shared body every round; fine-tuned at the end",
            Keep.HEAD, "finetuned", ("personal", "finetuned"), _FT),
    define_method("fedrep", "FedRep", "Collins et al. 2021, Exploiting Shared Representations for Personalized "
            "Federated Learning", "per round: head_epochs on the head (body frozen), then body_epochs on the body "
            "(head frozen); only the body is shared", Keep.HEAD, "personal", ("personal", "finetuned"),
            ("head_epochs", "body_epochs", *_FT), procedure="alternating"),
    define_method("ditto", "Ditto", "Li, Hu, Beirami, Smith 2021, Ditto: Fair and Robust Federated Learning Through "
            "Personalization", "the global model trains and is shared as in FedAvg; a personal model on the device "
            "trains with lam/2·||v - w_global||²", Keep.NONE, "personal", ("global", "finetuned", "personal"),
            ("lam", "personal_epochs", *_FT), personal_model=True, procedure="ditto"),
    define_method("fedbn", "FedBN", "Li, Jiang, Zhang, Kamp, Dou 2021, FedBN: Federated Learning on Non-IID Features "
            "via Local Batch Normalization", "batch-norm layers (scale, shift, running statistics) stay on the "
            "device; the rest is FedAvg", Keep.BATCH_NORM, "personal", ("personal", "finetuned"), _FT),
)}


def register_method(method: Method, *, replace_existing: bool = False) -> Method:
    """Make `method` selectable by name (`--personalization NAME`, the task on the wire): the server and
    every device must run the registration. An existing name is refused unless `replace_existing`."""
    if not isinstance(method, Method):
        raise MethodError(f"register_method takes a Method (see define_method), got {type(method).__name__}")
    if method.name in METHODS and not replace_existing:
        raise MethodError(f"a personalization method named {method.name!r} is registered already")
    define_method(method.name, method.title, method.paper, method.summary, method.keeps, method.serves,
                  method.candidates, personal_model=method.personal_model, procedure=method.procedure)  # checks
    METHODS[method.name] = method
    return method


def fleet_default(own: str, val_accuracy: Iterable[Mapping[str, float]]) -> str:
    """What devices serve when their own validation cannot tell: the method's `own` model, or local-only
    when the fleet's validation accuracies (one mapping per device, gathered by the server after the
    last round) say local-only is the more accurate on average. Pure, so the server decides it."""
    rows = [v for v in val_accuracy if own in v and LOCAL_ONLY in v]
    if rows and sum(v[LOCAL_ONLY] for v in rows) > sum(v[own] for v in rows):
        return LOCAL_ONLY
    return own


def get(name: str) -> Method:
    """The method registered under `name`; MethodError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown personalization method {name!r}; known: {', '.join(METHODS)}") from None
