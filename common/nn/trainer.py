"""Trainer.fit / evaluate / predict over a compiled, memory-planned graph.

Execution never allocates model tensors: compile once per batch size, then run steps. The
backward sequence per layer is calc-gradient, calc-derivative, apply-gradient -- in that order,
so a gradient lives only until its layer is updated (do not reorder).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..store import atomic_write_bytes
from . import rss
from .budget import Choice, choose, format_size, parse_size
from .errors import DataError, WeightError
from .graph import Compiled, output_size, weight_initializers, weight_specs
from .graph import compile as compile_graph
from .modes import DEFAULT_KERNELS, DEFAULT_MEMORY_MODE
from .optim import Optimizer, learning_rate, per_weight_decay
from .spec import ModelError, ModelSpec
from .swap import SwapFile, Swapper, swap_schedule

__all__ = ["DataError", "EvalResult", "FitResult", "MemoryReport", "Trainer", "WeightError", "warmup"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float, float], None]  # step, total steps, running loss, running accuracy


@dataclass
class FitResult:
    loss: float
    accuracy: float
    steps: int
    step_seconds: float  # median
    epochs: list[dict] = field(default_factory=list)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    examples: int


@dataclass
class MemoryReport:
    mode: str
    batch: int
    micro_batch: int
    lookahead: int
    naive_bytes: int
    arena_bytes: int
    lower_bound_bytes: int
    weights_bytes: int
    optimizer_bytes: int
    anchor_bytes: int = 0  # proximal anchors (FedProx, Ditto): one more copy of the anchored weights
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    swap_wait_seconds: float = 0.0
    rss_baseline_bytes: int | None = None
    rss_peak_bytes: int | None = None  # since the baseline (rss.mark_baseline)
    rss_process_peak_bytes: int | None = None  # the whole process, start-up included
    kernels: str = "numpy"
    budget_bytes: int | None = None  # --memory-budget, the whole process
    predicted_peak_bytes: int | None = None  # what the budget's choice predicted for the process

    def to_dict(self) -> dict:
        return asdict(self)


class _Store:
    """Where the persistent tensors (weights, statistics, optimizer state, anchors) are: before the
    first plan, arrays set so far and otherwise the initial values (drawn a layer at a time when
    asked, so a model's initial weights are never all in memory at once); then the training plan's
    arena views -- except, in swap-all mode, those that move through the plan's swap file, which hold
    their value there between fits."""

    def __init__(self, arrays: dict[str, np.ndarray], c: Compiled | None = None, file: SwapFile | None = None,
                 initial: Mapping[str, Callable[[], dict[str, np.ndarray]]] | None = None,
                 anchors: Mapping[str, tuple[int, ...]] | None = None):
        self.arrays = arrays
        self.file = file
        self.homes: dict[str, int] = dict(c.homes) if c is not None else {}  # name -> offset in the file
        self.info = {t.name: t for t in c.tensors if t.pinned and not t.external} if c is not None else {}
        self.initial = initial or {}
        self.anchors = anchors or {}  # anchor name -> shape: zeros until set
        self._drawn: tuple[Callable | None, dict[str, np.ndarray]] = (None, {})  # the last layer drawn

    def get(self, name: str) -> np.ndarray:
        """The tensor: a view into the arena or an array held here, else a copy read from the file or
        freshly drawn."""
        if name in self.arrays:
            return self.arrays[name]
        if name in self.homes:
            t = self.info[name]
            out = np.empty(t.shape, t.dtype)
            self.file.read(out, self.homes[name])
            return out
        if name in self.anchors:
            return np.zeros(self.anchors[name], np.float32)
        make = self.initial[name]
        if self._drawn[0] is not make:
            self._drawn = (make, make())
        return self._drawn[1][name]

    def put(self, name: str, values) -> None:
        if name in self.arrays:
            self.arrays[name][...] = values
            return
        if name not in self.homes:  # before any plan: hold it
            self.arrays[name] = np.array(values, dtype=np.float32, copy=True)
            return
        t = self.info[name]
        arr = np.empty(t.shape, t.dtype)
        arr[...] = values
        self.file.write(arr, self.homes[name])

    def detached(self, names) -> _Store:
        """This store without its plan's arena: copies of the tensors the arena holds (of `names`),
        the swap file (and what lives in it) kept. What a closed Trainer reads its weights from."""
        kept = {k: np.array(self.get(k), copy=True) for k in names if k not in self.homes}
        out = _Store(kept, file=self.file)
        out.homes, out.info = self.homes, self.info
        self.file = None
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class _Lazy(dict):
    """Weights for graph.compile, read from a store only when the new plan keeps them in its arena."""

    def __init__(self, store: _Store, names) -> None:
        super().__init__()
        self.store, self.names = store, set(names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> np.ndarray:
        return self.store.get(name)


class Trainer:
    """Trains one model on one device under a memory mode or a memory budget."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        memory: str = DEFAULT_MEMORY_MODE,
        memory_budget: str | int | None = None,
        lookahead: int = 2,
        micro_batch: int = 1,
        swap_dir: str | None = None,
        seed: int = 0,
        anchored: Iterable[str] = (),
        kernels: str | None = None,
    ) -> None:
        """`anchored`: weights that may get a proximal term (set_anchor / set_proximal); their anchors
        are pinned tensors of the plan, so the memory report and `memory_budget` count them.
        `kernels`: the kernel backend (modes.KERNEL_BACKENDS; default numpy)."""
        rss.steady_heap()  # weight-sized temporaries go back to the system when freed
        self.spec = spec
        self.memory, self.lookahead, self.micro_batch = memory, lookahead, micro_batch
        self.budget = parse_size(memory_budget) if memory_budget is not None else None
        self.swap_dir, self.seed = swap_dir, seed
        self._kernels_asked = kernels
        self.kernels = kernels or DEFAULT_KERNELS  # a memory budget may pick another when kernels is None
        self.optimizer = Optimizer(spec.optimizer, self.kernels)
        self._decay = per_weight_decay(spec)  # layers' L2 terms (NNTrainer weight_regularizer / *_decay)
        self.choice: Choice | None = None
        self._shapes = {k: ws.shape for k, ws in weight_specs(spec).items()}
        self._store = _Store({}, initial=weight_initializers(spec, seed))  # drawn when asked, until the first plan
        self.outputs = output_size(spec)  # values per example at the output (classes for Loss = cross)
        self._train: Compiled | None = None
        self._train_spec = spec  # spec with the layers frozen by set_frozen() marked trainable = false
        self._stale = False  # the training plan predates a set_frozen() change
        self._infer: dict[int, Compiled] = {}
        self._iteration = 0
        self._swap_totals = [0, 0, 0.0]
        self._anchored = frozenset(anchored)
        self._anchors: dict[str, tuple[int, ...]] = {}  # weight -> anchor shape (the values are in the store)
        self._mu: dict[str, float] = {}  # weight -> proximal coefficient (absent: none)
        if self._anchored:
            unknown = sorted(self._anchored - set(self._shapes))
            if unknown:
                raise WeightError(f"cannot anchor unknown weights: {', '.join(unknown)}")
            probe = compile_graph(spec, 1, anchored=self._anchored, allocate=False)
            self._anchors = {t.name.removesuffix(":anchor"): t.shape
                             for t in probe.tensors if t.role == "anchor"}  # statistics have no gradient: no anchor
            self._store.anchors = {f"{k}:anchor": shape for k, shape in self._anchors.items()}
        self._anchor_set: set[str] = set()

    # ---- weights -------------------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: np.array(self._store.get(k), copy=True) for k in self._shapes}

    def set_weights(self, weights: Mapping[str, np.ndarray], strict: bool = True) -> None:
        """Copy weights in by name; strict requires every weight. Unknown or misshaped names: WeightError."""
        unknown = sorted(set(weights) - set(self._shapes))
        missing = sorted(set(self._shapes) - set(weights)) if strict else []
        bad = [
            f"{k} {tuple(np.shape(v))} != {self._shapes[k]}"
            for k, v in weights.items()
            if k in self._shapes and tuple(np.shape(v)) != self._shapes[k]
        ]
        if unknown or missing or bad:
            parts = []
            if unknown:
                parts.append(f"unknown: {', '.join(unknown)}")
            if missing:
                parts.append(f"missing: {', '.join(missing)}")
            if bad:
                parts.append(f"wrong shape: {'; '.join(bad)}")
            raise WeightError("weights do not match the model: " + " | ".join(parts))
        for k, v in weights.items():
            arr = np.asarray(v, dtype=np.float32)
            if not np.all(np.isfinite(arr)):
                raise WeightError(f"weight {k} has NaN or Inf values")
            self._store.put(k, arr)

    def save_weights(self, path: str) -> None:
        """Weights by name as .npz, written atomically (a crash leaves the old file or none)."""
        buf = io.BytesIO()
        np.savez(buf, **self.get_weights())
        atomic_write_bytes(path, buf.getbuffer())

    def load_weights(self, path: str, strict: bool = True) -> None:
        with np.load(path) as data:
            self.set_weights({k: data[k] for k in data.files}, strict=strict)

    @property
    def weights_bytes(self) -> int:
        return sum(4 * int(np.prod(s)) for s in self._shapes.values())

    # ---- proximal term ---------------------------------------------------------------------
    @property
    def anchored(self) -> frozenset[str]:
        """Weights with an anchor tensor: those asked for at construction that have a gradient."""
        return frozenset(self._anchors)

    def set_anchor(self, weights: Mapping[str, np.ndarray]) -> None:
        """Copy anchor values (e.g. the round's global weights) for anchored weights by name; names the
        Trainer was not built to anchor are ignored, so a full weight dict can be passed."""
        for k, v in weights.items():
            if k not in self._anchors:
                continue
            arr = np.asarray(v, dtype=np.float32)
            if arr.shape != self._anchors[k]:
                raise WeightError(f"anchor {k} has shape {arr.shape}, the weight {self._anchors[k]}")
            self._store.put(f"{k}:anchor", arr)
            self._anchor_set.add(k)

    def set_proximal(self, mu: float | Mapping[str, float]) -> None:
        """Add mu/2 * ||w - anchor||^2 to the loss from the next step on: one mu for every anchored
        weight, or per weight (the others get none); 0 turns it off. The term is applied at
        apply-gradient, so it costs no memory beyond the anchors."""
        per = dict.fromkeys(self._anchors, float(mu)) if not isinstance(mu, Mapping) else dict(mu)
        bad = sorted(k for k, m in per.items() if m and k not in self._anchors)
        if bad:
            raise WeightError(f"no anchor for {', '.join(bad)} (anchored: {sorted(self._anchors) or 'none'})")
        unset = sorted(k for k, m in per.items() if m and k not in self._anchor_set)
        if unset:
            raise WeightError(f"set_anchor() first: no anchor value for {', '.join(unset)}")
        if any(not (m >= 0 and np.isfinite(m)) for m in per.values()):
            raise ValueError(f"proximal coefficients must be finite and >= 0, got {per}")
        self._mu = {k: m for k, m in per.items() if m > 0}

    # ---- phases ----------------------------------------------------------------------------
    @property
    def frozen(self) -> frozenset[str]:
        """Layers set_frozen() keeps from training (besides those the model marks trainable = false)."""
        return frozenset(ls.name for ls, orig in zip(self._train_spec.layers, self.spec.layers, strict=True)
                         if orig.trainable and not ls.trainable)

    def set_frozen(self, layers: Iterable[str]) -> None:
        """Train every layer but these from the next fit on (replaces the previous set; () unfreezes).
        A frozen layer behaves as `trainable = false`: no gradient, no update, batch norm uses its
        running statistics; the plan is recompiled, so it also needs no gradient memory."""
        names = frozenset(layers)
        unknown = sorted(names - {ls.name for ls in self.spec.layers})
        if unknown:
            raise ModelError("Model", "frozen", f"no layers named {unknown} in this model")
        if names == self.frozen:
            return
        self._train_spec = self.spec.with_changes(
            layers=tuple(replace(ls, trainable=False) if ls.name in names else ls for ls in self.spec.layers))
        self._stale = True  # the next fit compiles the new plan; weights and optimizer state carry over

    # ---- compile -------------------------------------------------------------------------
    def compile(self, batch: int) -> Compiled:
        """Plan training at `batch` (re-planned only when the batch size or the frozen layers change)."""
        if self._train is not None and self._train.batch == batch and not self._stale:
            return self._train
        spec, self._stale = self._train_spec, False
        mode, la, mb = self.memory, self.lookahead, self.micro_batch
        if self.budget is not None:
            old_plan, self._train = self._train, None  # the old plan's arena does not count against the new
            if old_plan is not None:
                old_plan.arena.release(old_plan.kept_between_fits())
            rss.trim_heap()
            self.choice = choose(spec, batch, self.budget, self.optimizer.slots, self._anchored,
                                 baseline=rss.rss_bytes(), kernels=self._kernels_asked)
            self._train = old_plan
            mode, la, mb = self.choice.mode, self.choice.lookahead, self.choice.micro_batch
            if self.choice.kernels != self.kernels:
                self.kernels = self.choice.kernels
                self.optimizer = Optimizer(self.spec.optimizer, self.kernels)
            log.info("memory budget %s: chose %s", format_size(self.budget), self.choice.describe())
        old, old_store = self._train, self._store
        self._infer.clear()
        c = compile_graph(spec, batch, mode=mode, lookahead=la, micro_batch=mb,
                          optimizer_slots=self.optimizer.slots, anchored=self._anchored,
                          weights=_Lazy(old_store, self._shapes), seed=self.seed, kernels=self.kernels)
        file = SwapFile(c.swap_file_bytes, self.swap_dir) if c.homes else None
        store = _Store({k: v for k, v in c.views.items() if k in self._shapes or ":opt" in k or ":anchor" in k},
                       c, file)
        # Carry everything over, one tensor at a time: weights (and statistics) where the new plan
        # keeps them in its file, optimizer state of the weights both plans train, anchors.
        for k in self._shapes:
            if k in c.homes:
                store.put(k, old_store.get(k))
        for name, slots in c.opt_names.items():
            olds = old.opt_names.get(name, []) if old is not None else []
            for k, o_new in enumerate(slots):
                store.put(o_new, old_store.get(olds[k]) if k < len(olds) else 0.0)
        for k in self._anchors:
            store.put(f"{k}:anchor", old_store.get(f"{k}:anchor"))
        old_store.close()
        self._store, self._train = store, c
        del old, old_store
        rss.trim_heap()
        log.info("training plan: memory=%s batch %d micro-batch %d, arena %d bytes (naive %d, lower bound %d)",
                 mode, batch, mb, c.plan.total, c.naive_bytes, c.lower_bound_bytes)
        return c

    def reset_optimizer(self) -> None:
        """Zero the optimizer state (momentum, Adam moments) and its step count (Adam's bias
        correction, the learning-rate schedule), so the next fit starts like a fresh optimizer: used
        when the weights are replaced (a new federated base, another training phase)."""
        self._iteration = 0
        if self._train is not None:
            for names in self._train.opt_names.values():
                for name in names:
                    self._store.put(name, 0.0)

    def _inference(self, batch: int) -> tuple[Compiled, Swapper | None]:
        """An inference plan over the weights where they are (arena views, or before any plan the
        initial arrays), cached; in swap-all mode one that reads them from the training plan's swap
        file a window at a time (never all at once), with the swapper that does it."""
        train = self._train
        if train is None or not train.homes:
            if batch not in self._infer:
                weights = {k: self._store.get(k) for k in self._shapes}
                self._infer[batch] = compile_graph(self.spec, batch, training=False, mode="planned",
                                                   external=weights, kernels=self.kernels)
            return self._infer[batch], None
        external = {k: self._store.get(k) for k in self._shapes if k not in train.homes}  # kept in the arena
        c = compile_graph(self.spec, batch, training=False, mode="swap-all", lookahead=train.lookahead,
                          external=external, file_homes={k: train.homes[k] for k in self._shapes if k in train.homes},
                          kernels=self.kernels)
        swapper = Swapper(swap_schedule(c.swap_items, c.swap_marks, c.swap_segments), c.arena.buffer,
                          file=self._store.file)
        try:
            swapper.prime()
        except BaseException:
            swapper.close()
            raise
        return c, swapper

    # ---- data checks -----------------------------------------------------------------------
    def _check_data(self, x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        shape = self.spec.layers[0].input_shape
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim < 2 or int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise DataError(f"x has shape {x.shape}; the model's input is {':'.join(map(str, shape))} per example")
        x = x.reshape(len(x), *shape)
        if y is None:
            return x, None
        y = np.asarray(y)
        if len(y) != len(x):
            raise DataError(f"x has {len(x)} examples but y has {len(y)}")
        if self.spec.loss == "cross":
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise DataError(f"Loss = cross needs integer class labels of shape (N,), got {y.dtype} {y.shape}")
            classes = self.outputs
            if len(y) and (y.min() < 0 or y.max() >= classes):
                raise DataError(f"labels must be in [0, {classes}), got [{y.min()}, {y.max()}]")
            return x, y.astype(np.int64)
        classes = self.outputs
        if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
            y = np.eye(classes, dtype=np.float32)[y]  # class labels -> one-hot targets
        return x, np.ascontiguousarray(y, dtype=np.float32).reshape(len(x), -1)


    # ---- training ----------------------------------------------------------------------------
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int | None = None,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int | None = None,
        learning_rate: float | None = None,
        progress: Progress | None = None,
        drop_last: bool = False,
    ) -> FitResult:
        """Train. A batch never exceeds the examples there are; the last partial batch of an epoch is
        filled up with the epoch's first examples (they train twice), so every example trains every
        epoch and the plan keeps one batch size. drop_last=True drops it instead (the old behaviour:
        a device with fewer than two batches of data then takes one step per epoch)."""
        x, y = self._check_data(x, y)
        for name, value in (("epochs", epochs), ("batch_size", batch_size), ("learning_rate", learning_rate)):
            if value is not None and not value > 0:  # None means "the model's"; 0 is not a silent default
                raise ValueError(f"{name} must be > 0, got {value}")
        epochs = epochs if epochs is not None else self.spec.epochs
        batch = min(batch_size if batch_size is not None else self.spec.batch_size, len(x))
        if batch < 1:
            raise DataError("no training examples")
        c = self.compile(batch)
        rng = np.random.default_rng(self.seed if seed is None else seed)
        per_epoch = len(x) // batch if drop_last else -(-len(x) // batch)
        total = per_epoch * epochs
        times: list[float] = []
        history = []
        swapper = self._start_swap(c)
        clean = False
        try:
            done = 0
            for epoch in range(epochs):
                order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
                loss_sum = 0.0
                correct = 0
                for b in range(per_epoch):
                    idx = order[b * batch : (b + 1) * batch]
                    if len(idx) < batch:  # the last partial batch: fill it from the start of the epoch
                        idx = np.concatenate((idx, order[: batch - len(idx)]))
                    t0 = time.perf_counter()
                    ls, cr = self._train_step(c, x, y, idx, swapper, learning_rate)
                    times.append(time.perf_counter() - t0)
                    loss_sum += ls
                    correct += cr
                    done += 1
                    if progress:
                        seen = (b + 1) * batch
                        progress(done, total, loss_sum / seen, correct / seen)
                n = per_epoch * batch
                history.append({"epoch": epoch + 1, "loss": loss_sum / n, "accuracy": correct / n})
                if not np.isfinite(loss_sum):
                    log.warning("loss is %s after epoch %d: lower the learning rate", loss_sum, epoch + 1)
            clean = True
        finally:
            self._stop_swap(swapper, clean)
            c.arena.release(c.kept_between_fits())  # activations and scratch: pages back to the system
        last = history[-1]
        return FitResult(last["loss"], last["accuracy"], total, float(np.median(times)), history)

    def _start_swap(self, c: Compiled) -> Swapper | None:
        """A swapper running the compiled swap items, or None when nothing is swapped. In swap-all
        mode it shares the plan's file, where the persistent tensors are between fits, and first
        reads in those that stay in the arena across iterations."""
        if not c.swap_items:
            return None
        sched = swap_schedule(c.swap_items, c.swap_marks, c.swap_segments)
        swapper = Swapper(sched, c.arena.buffer, self.swap_dir, file=self._store.file)
        try:
            swapper.prime()
        except BaseException:
            swapper.close()
            raise
        return swapper

    def _stop_swap(self, swapper: Swapper | None, clean: bool = True) -> None:
        """Write back what the swapper changed and close it; after a failed step (not `clean`) as far
        as that still works, without hiding the failure."""
        if swapper is not None:
            try:
                swapper.flush()  # the persistent tensors it changed go back to the file
            except Exception:
                if clean:
                    raise
                log.exception("could not write back the swapped tensors after a failed step")
            finally:
                swapper.close()
                self._swap_totals[0] += swapper.bytes_out
                self._swap_totals[1] += swapper.bytes_in
                self._swap_totals[2] += swapper.wait_seconds

    def _train_step(self, c: Compiled, x, y, idx, swapper: Swapper | None, lr: float | None) -> tuple[float, int]:
        """One batch: forward and backward per micro-batch; weights updated after the last one."""
        m = c.micro_batch
        mb = len(idx) // m
        base_lr = lr if lr is not None else self.spec.optimizer.learning_rate
        lr_now = learning_rate(base_lr, self.spec.scheduler, self._iteration)
        feed = c.feed
        feed.x, feed.scale = x, 1.0 / len(idx)
        loss_sum, correct = 0.0, 0
        for k in range(m):
            sl = idx[k * mb : (k + 1) * mb]
            feed.idx, feed.y = sl, y[sl]
            if swapper is not None:
                swapper.start_iteration(first=k == 0, apply=k == m - 1)
            for ni, node in enumerate(c.nodes):
                if swapper is not None:
                    swapper.before(node.order.forward)
                node.layer.forward(c.contexts[ni]["forward"], True)
                if swapper is not None:
                    swapper.after(node.order.forward)
            for ni in range(len(c.nodes) - 1, -1, -1):
                self._backward_step(c, ni, swapper, apply=(k == m - 1), first_micro=(k == 0), lr=lr_now)
            if swapper is not None:
                swapper.before(c.steps - 1)  # the events of steps that did not run this time
                swapper.after(c.steps - 1)
                swapper.finish_iteration()
            loss_sum += feed.loss_sum
            correct += feed.correct
        self._iteration += 1
        return loss_sum, correct

    def _backward_step(self, c: Compiled, ni: int, swapper, *, apply: bool, first_micro: bool, lr: float) -> None:
        """calc-gradient, calc-derivative, apply-gradient of one layer. Do not reorder."""
        node = c.nodes[ni]
        ctxs = c.contexts[ni]
        o = node.order
        if node.trains:
            if swapper is not None:
                swapper.before(o.calc_grad)
            run = ctxs["calc_grad"]
            run.accumulate = c.micro_batch > 1 and not first_micro  # the gradients are the accumulators
            node.layer.calc_gradient(run)
            if swapper is not None:
                swapper.after(o.calc_grad)
        if node.backprop:
            if swapper is not None:
                swapper.before(o.calc_deriv)
            node.layer.calc_derivative(ctxs["calc_deriv"])
            if swapper is not None:
                swapper.after(o.calc_deriv)
        if node.trains and apply:
            if swapper is not None:
                swapper.before(o.apply_grad)
            for v in c.apply_views[ni]:
                mu = self._mu.get(v.name, 0.0)
                self.optimizer.apply(v.weight, v.grad, v.opt, lr, self._iteration,
                                     anchor=v.anchor if mu else None, mu=mu, decay=self._decay.get(v.name, 0.0))
            if swapper is not None:
                swapper.after(o.apply_grad)

    # ---- inference -----------------------------------------------------------------------------
    def _forward_batches(self, x: np.ndarray, y: np.ndarray | None, batch: int, collect: np.ndarray | None):
        loss_sum, correct = 0.0, 0
        n = len(x)
        plans: dict[int, tuple[Compiled, Swapper | None]] = {}
        try:
            for start in range(0, n, batch):
                stop = min(start + batch, n)
                if stop - start not in plans:
                    plans[stop - start] = self._inference(stop - start)
                c, swapper = plans[stop - start]
                feed = c.feed
                feed.x, feed.idx = x[start:stop], None
                feed.y = None if y is None else y[start:stop]
                if swapper is not None:
                    swapper.start_iteration()
                for ni, node in enumerate(c.nodes):
                    if swapper is not None:
                        swapper.before(node.order.forward)
                    node.layer.forward(c.contexts[ni]["forward"], False)
                    if swapper is not None:
                        swapper.after(node.order.forward)
                if collect is not None:  # before the swapper's last events: they reuse the output's bytes
                    collect[start:stop] = c.contexts[-1]["forward"].out.reshape(stop - start, -1)
                if swapper is not None:
                    swapper.before(c.steps - 1)
                    swapper.after(c.steps - 1)
                    swapper.finish_iteration()
                if y is not None:
                    loss_sum += feed.loss_sum
                    correct += feed.correct
        finally:
            for _, swapper in plans.values():
                if swapper is not None:
                    swapper.close()
        return loss_sum, correct

    def _eval_batch(self) -> int:
        """Evaluation's default batch: a training (micro-)step's, so evaluating never needs more
        activation memory than training does; the model's batch size before any training plan --
        unless a memory budget is set: then the training plan is chosen first."""
        c = self._train
        if c is None and self.budget is not None:
            c = self.compile(self.spec.batch_size)
        return c.batch // c.micro_batch if c is not None else self.spec.batch_size

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int | None = None) -> EvalResult:
        x, y = self._check_data(x, y)
        if not len(x):
            raise DataError("no examples to evaluate")
        loss_sum, correct = self._forward_batches(x, y, batch_size or self._eval_batch(), None)
        return EvalResult(loss_sum / len(x), correct / len(x), len(x))

    def predict(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities (cross) or outputs (mse), one row per example."""
        x, _ = self._check_data(x, None)
        out = np.empty((len(x), self.outputs), np.float32)
        self._forward_batches(x, None, batch_size or self._eval_batch(), out)
        return out

    # ---- reports -----------------------------------------------------------------------------
    def memory_report(self, batch: int | None = None) -> MemoryReport:
        """Sizes of the training plan (compiled at `batch` if not yet) and what was measured."""
        last = self._train.batch if self._train is not None else self.spec.batch_size
        c = self.compile(batch or last)
        base = rss.baseline()
        return MemoryReport(
            mode=c.mode, batch=c.batch, micro_batch=c.micro_batch, lookahead=c.lookahead,
            naive_bytes=c.naive_bytes, arena_bytes=c.plan.total, lower_bound_bytes=c.lower_bound_bytes,
            weights_bytes=self.weights_bytes, optimizer_bytes=c.bytes_of("opt"), anchor_bytes=c.bytes_of("anchor"),
            swap_out_bytes=int(self._swap_totals[0]), swap_in_bytes=int(self._swap_totals[1]),
            swap_wait_seconds=float(self._swap_totals[2]),
            rss_baseline_bytes=base, rss_peak_bytes=rss.peak_rss_bytes() if base is not None else None,
            rss_process_peak_bytes=rss.process_peak_bytes(), kernels=self.kernels, budget_bytes=self.budget,
            predicted_peak_bytes=self.choice.peak_bytes if self.choice is not None else None,
        )

    def close(self) -> None:
        """Drop the arenas (swap files are already gone: they are unlinked when opened). The weights
        stay readable: those in the arena are copied out first; in swap-all mode the swap file stays
        open for the others, until the Trainer is dropped (never all of them in memory at once)."""
        if self._train is not None:
            self._store = self._store.detached([*self._shapes, *(f"{k}:anchor" for k in self._anchors)])
        self._train = None
        self._infer.clear()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def warmup(spec: ModelSpec, kernels: str | None = None, memory: str = DEFAULT_MEMORY_MODE) -> None:
    """Run every kernel the model uses once, on a tiny batch: loads them (numba: compiles them or loads
    them from its cache) and touches BLAS's buffers before a baseline is taken. In the memory mode
    the training will use, so warming up needs no more memory than training does."""
    t = Trainer(spec, memory=memory, seed=0, kernels=kernels)
    shape = spec.layers[0].input_shape
    x = np.zeros((2, *shape), np.float32)
    classes = t.outputs
    y = np.zeros(2, np.int64) if spec.loss == "cross" else np.zeros((2, classes), np.float32)
    t.fit(x, y, epochs=1, batch_size=2, shuffle=False)
    t.evaluate(x, y, batch_size=2)
    t.close()
    t._store.close()  # nothing to read back from a warm-up
