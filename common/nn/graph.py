"""Compile a ModelSpec for one batch size: ordered nodes, every tensor with its lifespan, aliasing,
a memory plan and the run contexts that execution uses. Planning happens here, once; the trainer
only executes the result (TensorFlow Lite's split between planning and execution).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .init import initialize
from .layers.base import LAYERS, Feed, InitContext, Layer, RunContext, Shape
from .layers.loss import CrossEntropyLoss, MSELoss
from .modes import DEFAULT_KERNELS, DEFAULT_MEMORY_MODE, KERNEL_BACKENDS, MEMORY_MODES
from .order import ExecOrder, Life, assign, num_steps, touches
from .planner import PLANNERS, Plan, Usage, aligned, lower_bound
from .pool import Arena
from .spec import LayerSpec, ModelError, ModelSpec
from .swap import Mark, Resident, SwapItem, SwapWindow

MODES = tuple(MEMORY_MODES)  # naive, planned, swap, swap-all: described in modes.py
SWAP_MODES = ("swap", "swap-all")
PERSISTENT = ("weight", "stat", "gradacc", "opt", "anchor")  # roles that outlive an iteration


@dataclass
class Node:
    """One executable layer: an INI layer, a realized activation, a multi-output split or the loss."""

    name: str
    layer: Layer
    spec_name: str  # the INI layer this node came from (weights are named after it)
    producers: list[tuple[int, int]]  # (node index, derivative slot) per input
    consumers: list[tuple[int, int]] = field(default_factory=list)  # (node index, input index)
    ctx: InitContext | None = None
    out_shape: Shape = ()
    trains: bool = False  # runs calc-gradient / apply-gradient
    backprop: bool = False  # runs calc-derivative (something upstream trains)
    order: ExecOrder | None = None


@dataclass
class TensorInfo:
    """One logical tensor: who touches it when, and which buffer group holds it."""

    name: str
    shape: Shape
    dtype: np.dtype
    role: str  # weight | stat | grad | gradacc | opt | anchor | act | deriv | scratch
    touches: set[int]
    pinned: bool = False  # lives the whole run (weights, optimizer state, accumulated gradients)
    external: bool = False  # provided by the caller (inference reads the trainer's weights)
    group: int = -1

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass
class Segment:
    """Where a buffer group lives during [first, last]; a swapped group has two segments."""

    first: int
    last: int
    offset: int = 0


@dataclass
class Group:
    """Tensors sharing one buffer (views and in-place outputs); the planner sees only groups."""

    members: list[int]
    nbytes: int
    touches: set[int]
    pinned: bool
    segments: list[Segment] = field(default_factory=list)
    window: SwapWindow | None = None  # swap mode: when the buffer is out of the arena
    # swap-all, a persistent tensor: its windows round the iteration, window j between segment j and
    # segment j + 1 (modulo their number); steps modulo the iteration's length
    cycle: list[SwapWindow] = field(default_factory=list)
    role: str = ""  # of its (first) member

    @property
    def swapped(self) -> bool:
        return self.window is not None or bool(self.cycle)


@dataclass
class WeightSpec:
    """A model weight as the federation sees it."""

    name: str
    layer: str
    shape: Shape
    trainable: bool  # changed by local training (trainable layer; includes batch-norm running stats)
    personal: bool


@dataclass
class Compiled:
    spec: ModelSpec
    batch: int
    training: bool
    mode: str
    nodes: list[Node]
    tensors: list[TensorInfo]
    groups: list[Group]
    plan: Plan
    arena: Arena
    steps: int
    lookahead: int
    micro_batch: int
    views: dict[str, np.ndarray]  # weights / stats / optimizer state / accumulated grads by name
    contexts: list[dict[str, RunContext]]  # per node: "forward", "calc_grad", "calc_deriv"
    feed: Feed  # the current batch, shared by every context: the trainer writes it before each step
    weight_owner: dict[str, int]  # weight name -> node index
    opt_names: dict[str, list[str]]  # trainable weight -> its optimizer state tensors
    naive_bytes: int
    lower_bound_bytes: int
    kernels: str = DEFAULT_KERNELS  # the kernel backend the layers were finalized for
    swap_items: list[SwapItem] = field(default_factory=list)  # what the swapper writes out / reads back, when
    swap_marks: list[Mark] = field(default_factory=list)  # swap-all: steps that change a persistent tensor
    swap_segments: list[Resident] = field(default_factory=list)  # swap-all: the persistent tensors' segments
    # swap-all: persistent tensors that live in the swap file between fits (name -> file offset); the
    # others are in `views`
    homes: dict[str, int] = field(default_factory=dict)
    swap_file_bytes: int = 0
    # per node: the views the optimizer step needs at apply-gradient, one per trained weight
    apply_views: list[list[ApplyViews]] = field(default_factory=list)

    @property
    def loss_node(self) -> Node:
        return self.nodes[-1]

    def bytes_of(self, role: str) -> int:
        return sum(t.nbytes for t in self.tensors if t.role == role and not t.external)

    def kept_between_fits(self) -> list[tuple[int, int]]:
        """(offset, bytes) of what the arena must keep when no step runs: the persistent tensors it
        holds (in swap-all, those not living in the swap file). Everything else can be released."""
        return [(s.offset, g.nbytes) for g in self.groups if g.pinned and not g.cycle for s in g.segments]


@dataclass
class ApplyViews:
    """What apply-gradient touches for one weight, resolved at that step."""

    name: str
    weight: np.ndarray
    grad: np.ndarray  # the gradient, or its accumulator when micro-batching
    opt: list[np.ndarray]
    anchor: np.ndarray | None


class MultiOut(Layer):
    """Hidden split node: one output read by several layers; its derivative sums theirs."""

    kind = "multiout"

    def __init__(self, name: str, fanout: int) -> None:
        self.name = name
        self.fanout = fanout

    def finalize(self, ctx: InitContext) -> Shape:
        ctx.view = True
        return ctx.input_shapes[0]

    def forward(self, run: RunContext, training: bool) -> None:
        if not run.aliased:
            np.copyto(run.output(), run.input())

    def calc_derivative(self, run: RunContext) -> None:
        din = run.din()
        if din is None:
            return
        douts = run.douts
        np.add(douts[0], douts[1], out=din)
        for d in douts[2:]:
            din += d


def _expand(spec: ModelSpec) -> list[Node]:
    """Layers in file order, with activations realized as their own nodes and the loss appended."""
    nodes: list[Node] = []
    out_of: dict[str, int] = {}  # INI layer name -> node producing its output
    for i, ls in enumerate(spec.layers):
        if ls.type == "input" and ls.input_layers:
            raise ModelError(ls.name, "input_layers", "an input layer takes no inputs")
        producers = [] if ls.type == "input" else [(out_of[src], 0) for src in spec.inputs_of(i)]
        if ls.type != "input" and not producers:
            raise ModelError(ls.name, "input_layers", "this layer has no input")
        nodes.append(Node(ls.name, LAYERS[ls.type](ls), ls.name, producers))
        if ls.type != "activation" and ls.activation not in (None, "none"):
            act = LayerSpec(f"{ls.name}_act", "activation", activation=ls.activation, trainable=ls.trainable)
            nodes.append(Node(f"{ls.name}/{ls.activation}", LAYERS["activation"](act), ls.name, [(len(nodes) - 1, 0)]))
        out_of[ls.name] = len(nodes) - 1
    last = nodes[-1]
    if spec.loss == "cross":
        if last.layer.kind == "activation":
            fn = last.layer.spec.activation
            if fn == "softmax":
                nodes.pop()
                last = nodes[-1]
            elif fn not in (None, "none"):
                raise ModelError(last.spec_name, "activation", f"Loss = cross needs softmax last, not {fn}")
        loss_layer: Layer = CrossEntropyLoss(LayerSpec("loss", "flatten"))
    else:
        loss_layer = MSELoss(LayerSpec("loss", "flatten"))
    nodes.append(Node("loss", loss_layer, "loss", [(len(nodes) - 1, 0)]))
    return nodes


def _insert_multiouts(nodes: list[Node]) -> list[Node]:
    """Give every output read by several layers a split node, so each derivative has one writer."""
    readers: dict[int, list[tuple[int, int]]] = {}
    for ci, n in enumerate(nodes):
        for ii, (p, _) in enumerate(n.producers):
            readers.setdefault(p, []).append((ci, ii))
    out: list[Node] = []
    new_index: dict[int, int] = {}
    split_of: dict[int, int] = {}
    slot_of: dict[tuple[int, int], int] = {}
    for i, n in enumerate(nodes):
        new_index[i] = len(out)
        out.append(n)
        fan = readers.get(i, [])
        if len(fan) > 1:
            split_of[i] = len(out)
            out.append(Node(f"{n.name}/split", MultiOut(f"{n.name}/split", len(fan)), n.spec_name, [(new_index[i], 0)]))
            for slot, reader in enumerate(fan):
                slot_of[reader] = slot
    for ci, n in enumerate(nodes):
        n.producers = [
            (split_of[p], slot_of[(ci, ii)]) if p in split_of else (new_index[p], 0)
            for ii, (p, _) in enumerate(n.producers)
        ]
    return out


def _finalized(spec: ModelSpec, batch: int, split: bool = False, kernels: str = DEFAULT_KERNELS,
               accumulates: bool = False) -> list[Node]:
    """The model's nodes (with split nodes if asked), finalized for `batch`: shapes and requests known."""
    nodes = _expand(spec)
    if split:
        nodes = _insert_multiouts(nodes)
    _finalize(nodes, batch, kernels, accumulates)
    return nodes


def _finalize(nodes: list[Node], batch: int, kernels: str = DEFAULT_KERNELS, accumulates: bool = False) -> None:
    """Finalize every node in order; then once more each node whose output some reader keeps for its
    own backward (through views), telling it so (`ctx.output_kept`: relu then saves no sign bits)."""
    for n in nodes:
        _finalize_one(nodes, n, batch, kernels, False, accumulates)
    kept = _outputs_kept(nodes)
    for ni, n in enumerate(nodes):
        if ni in kept and not n.ctx.view:
            before = n.out_shape
            _finalize_one(nodes, n, batch, kernels, True, accumulates)
            assert n.out_shape == before, f"{n.name}: output shape changed with output_kept"


def _finalize_one(nodes: list[Node], n: Node, batch: int, kernels: str, output_kept: bool, accumulates: bool) -> None:
    shapes = [nodes[p].out_shape for p, _ in n.producers]
    ctx = InitContext(n.spec_name, shapes, batch, kernels=kernels, output_kept=output_kept, accumulates=accumulates)
    shape = n.layer.finalize(ctx)
    if any(d <= 0 for d in shape):
        raise ModelError(n.spec_name, None, f"output shape {shape[1:]} is empty (input {[s[1:] for s in shapes]})")
    n.ctx, n.out_shape = ctx, tuple(shape)


def _outputs_kept(nodes: list[Node]) -> set[int]:
    """Nodes whose output a reader reads again in a backward step (its input_life), looking through
    view nodes (flatten, split, identity activations) to the buffer's producer."""
    kept: set[int] = set()
    for n in nodes:
        if not n.ctx.input_life & (Life.CALC_GRAD | Life.CALC_DERIV):
            continue
        for p, _ in n.producers:
            while True:
                kept.add(p)
                src = nodes[p]
                if not (src.ctx.view and len(src.producers) == 1):
                    break
                p = src.producers[0][0]
    return kept


def weight_specs(spec: ModelSpec) -> dict[str, WeightSpec]:
    """Every weight of the model by name, with shape and whether training changes it / it is personal."""
    nodes = _finalized(spec, 1)
    out: dict[str, WeightSpec] = {}
    for n in nodes:
        ls = _layer_spec(spec, n.spec_name)
        for w in n.ctx.weights:
            name = f"{n.spec_name}.{w.name}"
            out[name] = WeightSpec(name, n.spec_name, w.shape, bool(ls and ls.trainable), bool(ls and ls.personal))
    return out


def init_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh float32 weights for every weight of the model, reproducible from the seed."""
    out: dict[str, np.ndarray] = {}
    for make in dict.fromkeys(weight_initializers(spec, seed).values()):
        out.update(make())
    return out


def weight_initializers(spec: ModelSpec, seed: int = 0) -> dict[str, Callable[[], dict[str, np.ndarray]]]:
    """Weight name -> a function drawing the initial weights of its layer (all of them: a layer's
    weights come from one stream), the values of init_weights, one layer at a time."""
    nodes = _finalized(spec, 1)
    out = {}
    for li, n in enumerate(nodes):
        if not n.ctx.weights:
            continue

        def make(li=li, n=n) -> dict[str, np.ndarray]:
            rng = np.random.default_rng([seed, li])
            return {f"{n.spec_name}.{w.name}": initialize(rng, w) for w in n.ctx.weights}

        for w in n.ctx.weights:
            out[f"{n.spec_name}.{w.name}"] = make
    return out


def _layer_spec(spec: ModelSpec, name: str) -> LayerSpec | None:
    try:
        return spec.layer(name)
    except KeyError:
        return None


@dataclass
class _Table:
    """Every logical tensor of a compiled graph and, per node, the indices of its tensors."""

    tensors: list[TensorInfo] = field(default_factory=list)
    by_name: dict[str, int] = field(default_factory=dict)
    weights: list[list[int]] = field(default_factory=list)  # per node
    grads: list[list[int | None]] = field(default_factory=list)  # per node, parallel to weights
    opt_names: dict[str, list[str]] = field(default_factory=dict)
    weight_owner: dict[str, int] = field(default_factory=dict)
    outs: list[int] = field(default_factory=list)  # per node
    douts: list[list[int]] = field(default_factory=list)  # per node, one per derivative slot
    scratch: list[list[int | None]] = field(default_factory=list)  # per node, parallel to its requests

    def add(self, name: str, shape: Shape, dtype, role: str, t: set[int], pinned: bool = False,
            external: bool = False) -> int:
        self.by_name[name] = len(self.tensors)
        self.tensors.append(TensorInfo(name, tuple(shape), np.dtype(dtype), role, set(t), pinned, external))
        return len(self.tensors) - 1


def _schedule(nodes: list[Node], spec: ModelSpec, training: bool) -> int:
    """Link readers, decide which steps run (calc-gradient where weights train, calc-derivative where
    something upstream trains), number the steps; returns the number of steps."""
    for ci, n in enumerate(nodes):
        for ii, (p, _) in enumerate(n.producers):
            nodes[p].consumers.append((ci, ii))
    for n in nodes:
        ls = _layer_spec(spec, n.spec_name)
        has_grad = any(w.trainable for w in n.ctx.weights)
        n.trains = training and has_grad and bool(ls and ls.trainable)
        n.backprop = training and any(nodes[p].trains or nodes[p].backprop for p, _ in n.producers)
    orders = assign([n.trains for n in nodes])
    for n, o in zip(nodes, orders, strict=True):
        n.order = o
    return num_steps(orders)


def _runs(n: Node, life: Life) -> Life:
    """The part of `life` whose steps node `n` actually runs."""
    keep = Life.FORWARD
    if n.trains:
        keep |= Life.CALC_GRAD | Life.APPLY_GRAD
    if n.backprop:
        keep |= Life.CALC_DERIV
    return life & keep


def _tensor_table(nodes: list[Node], steps: int, micro_batch: int, optimizer_slots: int,
                  external: Mapping[str, np.ndarray], dtype, anchored: frozenset[str] = frozenset()) -> _Table:
    """Every tensor with the steps that touch it: weights, gradients, optimizer state, proximal
    anchors, activations, derivatives and layer scratch."""
    tab = _Table()
    for ni, n in enumerate(nodes):
        w_ids, g_ids = [], []
        o = n.order
        # Persistent tensors (pinned: they outlive the iteration) with the steps that really touch
        # them: weights and statistics at the node's forward and backward steps, accumulators at
        # calc-gradient and apply-gradient, optimizer state and anchors at apply-gradient.
        uses = {o.forward} | set(touches(_runs(n, Life.BACKWARD), o))
        for w in n.ctx.weights:
            name = f"{n.spec_name}.{w.name}"
            tab.weight_owner[name] = ni
            role = "weight" if w.trainable else "stat"
            if name in external:
                w_ids.append(tab.add(name, w.shape, dtype, role, set(), pinned=True, external=True))
            else:
                w_ids.append(tab.add(name, w.shape, dtype, role, uses, pinned=True))
            if w.trainable and name in anchored:  # also while the layer is frozen: the value must survive
                tab.add(f"{name}:anchor", w.shape, dtype, "anchor", {o.apply_grad} if n.trains else uses, pinned=True)
            if not (n.trains and w.trainable):
                g_ids.append(None)
                continue
            if micro_batch > 1:  # the layer adds each micro-batch's gradient to its accumulator itself
                g_ids.append(tab.add(f"{name}:gradacc", w.shape, dtype, "gradacc", {o.calc_grad, o.apply_grad},
                                     pinned=True))
            else:
                g_ids.append(tab.add(f"{name}:grad", w.shape, dtype, "grad", {o.calc_grad, o.apply_grad}))
            tab.opt_names[name] = [f"{name}:opt{k}" for k in range(optimizer_slots)]
            for opt in tab.opt_names[name]:
                tab.add(opt, w.shape, dtype, "opt", {o.apply_grad}, pinned=True)
        tab.weights.append(w_ids)
        tab.grads.append(g_ids)
    # Activations: written at the producer's forward, read by each consumer's forward and by whoever
    # needs them again in backward.
    for n in nodes:
        t = {n.order.forward} | set(touches(_runs(n, n.ctx.output_life), n.order))
        for ci, _ in n.consumers:
            c = nodes[ci]
            t |= {c.order.forward} | set(touches(_runs(c, c.ctx.input_life), c.order))
        tab.outs.append(tab.add(f"{n.name}:out", n.out_shape, dtype, "act", t))
    # Derivatives: slot s of node n is written by its s-th reader's calc-derivative.
    for ni, n in enumerate(nodes):
        ids = []
        if (n.trains or n.backprop) and n.consumers:
            fan = n.layer.fanout if isinstance(n.layer, MultiOut) else 1
            for s in range(fan):
                t = set(touches(_runs(n, Life.CALC_GRAD | Life.CALC_DERIV), n.order))
                for ci, ii in n.consumers:
                    if nodes[ci].producers[ii] == (ni, s):
                        t.add(nodes[ci].order.calc_deriv)
                suffix = f":dout{s}" if fan > 1 else ":dout"
                ids.append(tab.add(f"{n.name}{suffix}", n.out_shape, dtype, "deriv", t))
        tab.douts.append(ids)
    for n in nodes:
        ids = []
        for r in n.ctx.scratch:
            t = set(touches(_runs(n, r.life), n.order))
            rdt = dtype if np.dtype(r.dtype) == np.float32 else r.dtype
            ids.append(tab.add(f"{n.name}:{r.name}", r.shape, rdt, "scratch", t) if t else None)
        tab.scratch.append(ids)
    return tab


def _groups(tab: _Table, nodes: list[Node], share: bool) -> tuple[list[Group], list[bool]]:
    """Buffer groups: one per tensor, merged (when `share`) where a view or an in-place op may use
    the same bytes because no touch of the old value comes after the overwrite. Returns the groups
    and, per node, whether its output shares its input's buffer."""
    tensors = tab.tensors
    parent = list(range(len(tensors)))
    group_touch: dict[int, set[int]] = {i: set(t.touches) for i, t in enumerate(tensors)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
            group_touch[ra] |= group_touch.pop(rb)

    aliased = [False] * len(nodes)
    for ni, n in enumerate(nodes):
        if not share or len(n.producers) != 1 or not (n.ctx.view or n.ctx.inplace):
            continue
        p, slot = n.producers[0]
        src, out = tab.outs[p], tab.outs[ni]
        if tensors[src].nbytes != tensors[out].nbytes:
            continue
        if not n.ctx.view and max(group_touch[find(src)]) > n.order.forward:
            continue  # someone reads the input after this layer would overwrite it
        union(src, out)
        aliased[ni] = True
        # The derivative follows the output: din written into the same bytes as dout.
        if (n.ctx.view or n.ctx.deriv_inplace) and tab.douts[ni] and tab.douts[p]:
            d_in, d_out = tab.douts[p][slot], tab.douts[ni][0]
            cd = n.order.calc_deriv
            if max(group_touch[find(d_out)]) <= cd and min(group_touch[find(d_in)]) >= cd:
                union(d_out, d_in)
            elif n.ctx.view:  # view layers skip their derivative copy when aliased; never true by construction
                raise AssertionError(f"{n.name}: the derivative of a view could not share its buffer")

    groups: list[Group] = []
    root_group: dict[int, int] = {}
    for i, t in enumerate(tensors):
        if t.external:
            continue
        r = find(i)
        if r not in root_group:
            root_group[r] = len(groups)
            groups.append(Group([], 0, group_touch[r], False))
        g = groups[root_group[r]]
        g.members.append(i)
        g.nbytes = max(g.nbytes, t.nbytes)
        g.pinned = g.pinned or t.pinned
        g.role = g.role or t.role
        t.group = root_group[r]
    return groups, aliased


def _cycle_windows(touched: set[int], steps: int, lookahead: int, writes: bool) -> list[SwapWindow]:
    """A persistent tensor's windows out of the arena, round the iteration: after each touch whose
    next touch (possibly in the next iteration) comes more than lookahead + 2 steps later. Steps
    are taken modulo `steps`; a window written out (`writes`) frees its bytes one step later than
    one only dropped."""
    ts = sorted(touched)
    out = []
    for k, a in enumerate(ts):
        b = ts[k + 1] if k + 1 < len(ts) else ts[0] + steps
        free_at, load_at = a + (2 if writes else 1), b - lookahead
        if load_at > free_at:
            out.append(SwapWindow(a % steps, free_at % steps, load_at % steps, b % steps))
    return out


def _lifespans(groups: list[Group], mode: str, n_forward: int, steps: int, lookahead: int,
               writes: bool = True) -> None:
    """Segments per group. Naive: everything lives the whole iteration. Swap: a group idle between its
    last forward use and its first backward use is out of memory in between; its window says when
    (the one place the swap timing is decided). Swap-all: besides, a persistent tensor is out of
    memory between touches further apart than the lookahead (round the iteration): segment j runs
    from the load of window j - 1 to the step before window j frees its bytes, and may wrap."""
    for g in groups:
        whole = mode == "naive" or g.pinned
        first, last = (0, steps - 1) if whole else (min(g.touches), max(g.touches))
        g.segments = [Segment(first, last)]
        if mode == "swap-all" and g.pinned and g.touches:
            g.cycle = _cycle_windows(g.touches, steps, lookahead, writes=writes and g.role != "anchor")
            k = len(g.cycle)
            if k:
                g.segments = [Segment(g.cycle[j - 1].load_at, (g.cycle[j].free_at - 1) % steps) for j in range(k)]
            continue
        if mode in SWAP_MODES and not g.pinned:
            fwd = [t for t in g.touches if t < n_forward]
            bwd = [t for t in g.touches if t >= n_forward]
            if fwd and bwd:
                w = SwapWindow(
                    last_forward=max(fwd),
                    free_at=max(fwd) + 2,  # the write-out runs during the next step; its bytes are reused after
                    load_at=min(bwd) - lookahead,  # read back `lookahead` steps ahead of use
                    first_backward=min(bwd),
                )
                if w.load_at > w.free_at:
                    g.window = w
                    g.segments = [Segment(first, w.free_at - 1), Segment(w.load_at, last)]


# When a persistent tensor's next use needs it read back (the micro-iteration's phase), and which of
# its touches change it (so it must be written out) or use it up (so it need not be).
LOAD_WHEN = {"weight": "always", "stat": "always", "gradacc": "not_first", "opt": "apply", "anchor": "apply"}


def _marks(g: Group, slot: int, n: Node) -> list[Mark]:
    """The steps of node `n` that change (or spend) group g; a node that does not train changes
    nothing (a frozen batch norm keeps its statistics)."""
    if not n.trains:
        return []
    o = n.order
    if g.role == "weight":
        return [Mark(slot, o.apply_grad, "apply")]
    if g.role == "stat":
        return [Mark(slot, o.forward)]  # a training batch norm updates its running statistics
    if g.role == "gradacc":  # accumulated into at calc-gradient, spent by the optimizer
        return [Mark(slot, o.calc_grad), Mark(slot, o.apply_grad, "apply", dirty=False)]
    if g.role == "opt":
        return [Mark(slot, o.apply_grad, "apply")]
    return []  # anchors are written from outside, straight into the file


def _swap_items(groups: list[Group], tab: _Table, nodes: list[Node], steps: int,
                file_homes: Mapping[str, int] | None = None,
                ) -> tuple[list[SwapItem], list[Mark], list[Resident], dict[str, int], int]:
    """One item per swap window with its planned offsets and its place in the swap file; for
    swap-all also the marks, the persistent segments (those in the arena across the iteration
    boundary flagged) and each swapped persistent tensor's home in the file: a place of its own, or
    where `file_homes` says (inference over a training plan's file, where a weight with no window
    stays in the arena, read in once). Returns (items, marks, segments, homes, file bytes)."""
    tensors = tab.tensors
    items, marks, resident, homes = [], [], [], {}
    file_offset = slot = 0
    for g in groups:
        name = tensors[g.members[0]].name
        if file_homes is not None and g.pinned and not g.cycle and name in file_homes:
            seg = g.segments[0]
            resident.append(Resident(slot, seg.offset, file_homes[name], g.nbytes, seg.first, seg.last))
            homes[name] = file_homes[name]
            slot += 1
            continue
        if g.window is not None:
            out_seg, in_seg = g.segments
            items.append(SwapItem(g.nbytes, out_seg.offset, in_seg.offset, file_offset, *g.window))
            file_offset += g.nbytes
        elif g.cycle:
            home = file_homes[name] if file_homes is not None else file_offset
            k = len(g.cycle)
            for j, w in enumerate(g.cycle):
                load_when = LOAD_WHEN[g.role]
                if w.load_at > w.first_backward:  # the read starts in the iteration before its use
                    load_when = "always"
                items.append(SwapItem(g.nbytes, g.segments[j].offset, g.segments[(j + 1) % k].offset, home,
                                      *w, slot=slot, load_when=load_when, cycle=steps))
            marks += _marks(g, slot, nodes[tab.weight_owner[name.split(":", 1)[0]]])
            resident += [Resident(slot, seg.offset, home, g.nbytes, seg.first, seg.last, seg.first > seg.last)
                         for seg in g.segments]
            homes[name] = home
            if file_homes is None:
                file_offset += g.nbytes
            slot += 1
    return items, marks, resident, homes, file_offset


def compile(  # noqa: A001  (the graph's one verb)
    spec: ModelSpec,
    batch: int,
    *,
    training: bool = True,
    mode: str = DEFAULT_MEMORY_MODE,
    lookahead: int = 2,
    micro_batch: int = 1,
    optimizer_slots: int = 0,
    anchored: frozenset[str] = frozenset(),
    external: Mapping[str, np.ndarray] | None = None,
    weights: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    allocate: bool = True,
    dtype: type = np.float32,
    kernels: str = DEFAULT_KERNELS,
    file_homes: Mapping[str, int] | None = None,
) -> Compiled:
    """Order, size and plan the model for `batch` examples per (micro-)step.

    micro_batch > 1 compiles for batch // micro_batch examples and keeps gradients across the
    micro-steps of one batch. `anchored` weights (those with a gradient) get a pinned `<name>:anchor`
    tensor, zeroed, for a proximal term. `external` weights are used in place (not allocated in the arena);
    `weights` are copied into the arena (default: fresh ones from `seed`).
    With allocate=False only the sizes are computed (for budget search and `plan` reports).
    dtype=np.float64 exists for gradient checks; training runs in float32. `kernels` names the kernel
    backend the layers run (modes.KERNEL_BACKENDS); it changes some scratch requests, so the plan.
    `file_homes` (swap-all inference): where a training plan's swap file holds each weight that is not
    `external`; the weights are then read from there a window at a time, never all at once.
    """
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(f"kernels must be one of {tuple(KERNEL_BACKENDS)}, got {kernels!r}")
    if mode not in MODES:
        raise ValueError(f"memory mode must be one of {MODES}, got {mode!r}")
    if micro_batch < 1 or batch % micro_batch:
        raise ValueError(f"micro_batch {micro_batch} must divide the batch size {batch}")
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    nodes = _finalized(spec, batch // micro_batch, split=True, kernels=kernels, accumulates=micro_batch > 1)
    steps = _schedule(nodes, spec, training)
    tab = _tensor_table(nodes, steps, micro_batch, optimizer_slots, external or {}, dtype, frozenset(anchored))
    if mode == "swap-all" and not training and file_homes is None:
        raise ValueError("swap-all inference reads weights from a training plan's swap file: give file_homes")
    groups, aliased = _groups(tab, nodes, share=mode != "naive")
    _lifespans(groups, mode, len(nodes), steps, lookahead, writes=training)

    usages = [Usage(g.nbytes, s.first, s.last) for g in groups for s in g.segments]
    plan = PLANNERS["naive" if mode == "naive" else "greedy_by_size"](usages)
    offsets = iter(plan.offsets)
    for g in groups:
        for s in g.segments:
            s.offset = next(offsets)
    items, marks, resident, homes, file_bytes = _swap_items(groups, tab, nodes, steps, file_homes)
    compiled = Compiled(
        spec=spec, batch=batch, training=training, mode=mode, nodes=nodes, tensors=tab.tensors, groups=groups,
        plan=plan, arena=Arena.from_plan(usages, plan) if allocate else None, steps=steps, lookahead=lookahead,
        micro_batch=micro_batch, views={}, contexts=[], feed=Feed(), weight_owner=tab.weight_owner, kernels=kernels,
        opt_names=tab.opt_names,
        naive_bytes=sum(aligned(t.nbytes) for t in tab.tensors if not t.external),
        lower_bound_bytes=lower_bound(usages),
        swap_items=items, swap_marks=marks, swap_segments=resident, homes=homes, swap_file_bytes=file_bytes,
    )
    if allocate:
        init = weights if weights is not None else ({} if external else init_weights(spec, seed))
        _bind(compiled, tab, aliased, external or {}, init, seed)
    return compiled


def _bind(c: Compiled, tab: _Table, aliased: list[bool], external: Mapping[str, np.ndarray],
          init: Mapping[str, np.ndarray], seed: int) -> None:
    """Views into the arena: pinned tensors by name (weights filled from `init`, optimizer state and
    accumulators zeroed) and one RunContext per node and step kind, resolved at that step. Persistent
    tensors that swap-all moves through the file get no view by name: their values are the caller's
    to write into the file (`Compiled.homes`), and the steps that touch them see the segment of
    their step."""
    tensors, groups, arena = tab.tensors, c.groups, c.arena

    def view(i: int | None, step: int) -> np.ndarray | None:
        if i is None:
            return None
        t = tensors[i]
        if t.external:
            return external[t.name]
        g = groups[t.group]
        for s in g.segments:
            if Usage(0, s.first, s.last).covers(step):
                return arena.view(s.offset, t.shape, t.dtype)
        return arena.view(g.segments[0].offset, t.shape, t.dtype)  # untouched at this step

    for t in tensors:
        if not t.pinned or t.name in c.homes:
            continue
        c.views[t.name] = view(tab.by_name[t.name], 0)
        if t.role in ("weight", "stat") and not t.external:
            if t.name not in init:
                raise KeyError(f"no value for weight {t.name!r}")
            c.views[t.name][...] = init[t.name]
        elif t.role in ("opt", "gradacc", "anchor"):
            c.views[t.name][...] = 0.0

    nodes = c.nodes
    for ni, n in enumerate(nodes):
        make_state = n.layer.State
        state = make_state(np.random.default_rng([seed, ni, 7])) if make_state is not None else None
        per_step: dict[str, RunContext] = {}
        for kind, step in (("forward", n.order.forward), ("calc_grad", n.order.calc_grad),
                           ("calc_deriv", n.order.calc_deriv)):
            run = RunContext()
            run.inputs = [view(tab.outs[p], step) for p, _ in n.producers]
            run.out = view(tab.outs[ni], step)
            run.weights = [view(w, step) for w in tab.weights[ni]]
            run.grads = [view(g, step) for g in tab.grads[ni]]
            run.tensors = [view(s, step) for s in tab.scratch[ni]]
            run.dins = [view(tab.douts[p][s], step) if tab.douts[p] else None for p, s in n.producers]
            run.douts = [view(d, step) for d in tab.douts[ni]]
            run.dout_ = run.douts[0] if run.douts else None
            run.aliased = aliased[ni]
            run.feed = c.feed
            run.state = state
            per_step[kind] = run
        c.contexts.append(per_step)
        applies = []
        o = n.order
        for w_id, g_id in zip(tab.weights[ni], tab.grads[ni], strict=True):
            if g_id is None:
                continue
            name = tensors[w_id].name
            anchor = tab.by_name.get(f"{name}:anchor")
            applies.append(ApplyViews(
                name, view(w_id, o.apply_grad), view(g_id, o.apply_grad),
                [view(tab.by_name[k], o.apply_grad) for k in tab.opt_names.get(name, [])],
                view(anchor, o.apply_grad),
            ))
        c.apply_views.append(applies)


def output_size(spec: ModelSpec) -> int:
    """Values per example at the model's output (classes for Loss = cross)."""
    nodes = _finalized(spec, 1)
    return int(np.prod(nodes[-1].out_shape[1:]))


def param_count(spec: ModelSpec) -> int:
    return sum(math.prod(w.shape) for w in weight_specs(spec).values())
