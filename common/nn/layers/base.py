"""The layer contract: layers *request* tensors while finalizing, and only read and write the
views a run context hands them. Layer code never allocates (no np.empty / np.zeros).

finalize(ctx) -> output shape          (batch dimension included)
forward(run, training)                  reads run.input(i), writes run.output()
calc_gradient(run)                      writes run.grad(k) for its trainable weights -- or, when
                                        run.accumulate is set (micro-batching), adds to it
calc_derivative(run)                    writes run.din(i) = dL/d input i from run.dout()

Integer handles returned by request_* index into run.weight / run.grad / run.tensor.
What crosses steps is typed, never a string-keyed bag: `run.feed` (the current batch, one `Feed`
per compiled graph, written by the trainer) and `run.state` (a layer's own `LayerState` record,
one per node, when its class names one in `State`). A misspelled field is an AttributeError.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..order import Life
from ..spec import LayerSpec, ModelError
from . import KINDS

Shape = tuple[int, ...]


@dataclass
class WeightRequest:
    name: str  # short name: "weight", "bias", "gamma", ...; full name is "<layer>.<name>"
    shape: Shape
    initializer: str  # one of spec.INITIALIZERS
    trainable: bool  # False for running statistics (updated in forward, no gradient)
    fan_in: int = 1
    fan_out: int = 1


@dataclass
class ScratchRequest:
    name: str
    shape: Shape
    life: Life  # which of this layer's steps touch it
    dtype: type = np.float32


@dataclass
class InitContext:
    """What finalize sees: the input shapes, and where it records its requests."""

    layer_name: str
    input_shapes: list[Shape]
    batch: int
    kernels: str = "numpy"  # the kernel backend (modes.KERNEL_BACKENDS): `kernels.for_backend` resolves it
    weights: list[WeightRequest] = field(default_factory=list)
    scratch: list[ScratchRequest] = field(default_factory=list)
    # When, beyond its own forward, this layer reads its inputs / its output.
    input_life: Life = Life.NONE
    output_life: Life = Life.NONE
    # The output may share the input's buffer (elementwise in place) or is a reshape of it.
    inplace: bool = False
    view: bool = False
    # calc_derivative may write din into the same buffer as dout (elementwise).
    deriv_inplace: bool = False
    # Set by the graph (it finalizes such a layer again): some reader of this layer's output keeps it
    # for its own backward anyway, so keeping it costs nothing more (relu then reads its signs there).
    output_kept: bool = False
    # Micro-batching: calc_gradient will be asked to add into the gradients (run.accumulate), which are
    # then the accumulators themselves; a layer requests the small scratch that takes.
    accumulates: bool = False

    def request_weight(
        self, name: str, shape: Shape, initializer: str, trainable: bool = True, fan_in: int = 1, fan_out: int = 1
    ) -> int:
        self.weights.append(WeightRequest(name, tuple(shape), initializer, trainable, fan_in, fan_out))
        return len(self.weights) - 1

    def request_tensor(self, name: str, shape: Shape, life: Life, dtype: type = np.float32) -> int:
        self.scratch.append(ScratchRequest(name, tuple(shape), life, dtype))
        return len(self.scratch) - 1

    def error(self, key: str | None, reason: str) -> ModelError:
        return ModelError(self.layer_name, key, reason)


@dataclass(slots=True)
class Feed:
    """The current (micro-)batch: one record per compiled graph, shared by reference by all its run
    contexts and reused every step. The trainer writes x / idx / y / scale before a forward; the
    loss layer's forward writes loss_sum / correct."""

    x: np.ndarray | None = None  # the examples; input layers copy rows `idx` of it into the arena
    idx: np.ndarray | None = None  # this (micro-)batch's rows of x; None: all of x
    y: np.ndarray | None = None  # labels (cross) or targets (mse) of those rows; None: no loss (predict)
    scale: float = 1.0  # 1 / examples in the whole batch (micro-batches of one batch share it)
    loss_sum: float = 0.0  # summed loss over this (micro-)batch
    correct: int = 0  # correct predictions in this (micro-)batch


@dataclass(slots=True)
class LayerState:
    """Values one node keeps across its steps (e.g. forward -> calc-derivative), shared by the node's
    run contexts. A layer that needs some subclasses this and names it in `Layer.State`; the graph
    makes one per node with a generator seeded from (compile seed, node index)."""

    rng: np.random.Generator


class RunContext:
    """Views for one layer at one step. Built by the graph; resolved again when swapping moves a tensor."""

    __slots__ = ("inputs", "out", "weights", "grads", "tensors", "dins", "dout_", "douts", "aliased", "feed",
                 "state", "accumulate")

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []
        self.out: np.ndarray | None = None
        self.weights: list[np.ndarray] = []
        self.grads: list[np.ndarray | None] = []
        self.tensors: list[np.ndarray] = []
        self.dins: list[np.ndarray | None] = []
        self.dout_: np.ndarray | None = None
        self.douts: list[np.ndarray] = []  # every derivative slot of the output (a split node has one per reader)
        self.aliased: bool = False  # output shares the input's buffer (in place or view)
        self.feed: Feed = Feed()  # replaced by the graph's shared record
        self.state: LayerState | None = None  # the node's own record, if its layer class names one
        self.accumulate: bool = False  # calc_gradient adds to the gradients instead of writing them

    def input(self, i: int = 0) -> np.ndarray:
        return self.inputs[i]

    def output(self) -> np.ndarray:
        return self.out

    def weight(self, k: int) -> np.ndarray:
        return self.weights[k]

    def grad(self, k: int) -> np.ndarray | None:
        return self.grads[k]

    def tensor(self, k: int) -> np.ndarray:
        return self.tensors[k]

    def din(self, i: int = 0) -> np.ndarray | None:
        """Where to write dL/d input i, or None when nothing upstream needs it."""
        return self.dins[i]

    def dout(self) -> np.ndarray:
        return self.dout_


class Layer:
    """Base class: subclasses set `kind` and implement finalize + the three steps."""

    kind: ClassVar[str] = ""
    has_weights: ClassVar[bool] = False
    State: ClassVar[type[LayerState] | None] = None  # per-node record in run.state (None: no state)

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec
        self.name = spec.name

    def finalize(self, ctx: InitContext) -> Shape:
        raise NotImplementedError

    def forward(self, run: RunContext, training: bool) -> None:
        raise NotImplementedError

    def calc_gradient(self, run: RunContext) -> None:
        """Default: nothing to do (no trainable weights)."""

    def calc_derivative(self, run: RunContext) -> None:
        raise NotImplementedError


_CLASSES: dict[str, type[Layer]] = {}  # filled by @register as kind modules are imported


def register(cls: type[Layer]) -> type[Layer]:
    """Class decorator: make a layer class the implementation of its INI type (a KINDS entry)."""
    if cls.kind not in KINDS:
        raise TypeError(f"{cls.__name__}: layer kind {cls.kind!r} is not in fedpers.nn.layers.KINDS")
    _CLASSES[cls.kind] = cls
    return cls


class _Registry(Mapping[str, "type[Layer]"]):
    """INI type -> layer class. The keys are KINDS; a kind's module is imported on first lookup."""

    def __getitem__(self, kind: str) -> type[Layer]:
        cls = _CLASSES.get(kind)
        if cls is None:
            if kind not in KINDS:
                raise KeyError(kind)
            if not KINDS[kind].module:
                raise LookupError(f"layer kind {kind!r} was added, but no class of that kind is @registered")
            module = importlib.import_module(KINDS[kind].module_path(__package__))
            cls = _CLASSES.get(kind)
            if cls is None:
                raise LookupError(f"{module.__name__} registers no layer of kind {kind!r}")
        return cls

    def __contains__(self, kind: object) -> bool:
        return kind in KINDS

    def __iter__(self) -> Iterator[str]:
        return iter(KINDS)

    def __len__(self) -> int:
        return len(KINDS)


LAYERS: Mapping[str, type[Layer]] = _Registry()


Initializer = Callable[[np.random.Generator, WeightRequest], np.ndarray]
