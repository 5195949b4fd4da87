"""Run ONE layer standalone, the way the graph would, but with plain numpy buffers (tests may allocate).

`LayerRun` builds the InitContext, allocates an array for every request, fills a RunContext and runs
forward / calc_gradient / calc_derivative. It also enforces the lifespan contract: before each step,
every buffer the layer did not declare for that step (inputs outside `input_life`, the output outside
`output_life`, scratch outside its `life`) is stashed and filled with poison (NaN for floats); after
the step the poison must be intact (nothing written) and the step's results finite (nothing read),
then the stash is put back. So a layer that declares too little fails here, as it would corrupt
memory under the planner. Gradients and derivatives are poisoned before they are written, so a layer
must overwrite them, never accumulate into them.

`check_gradients` compares dL/dinputs and dL/dweights with central finite differences, for
L = sum(out * R) with a random R (or any objective, e.g. a loss layer's scaled loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from fedpers.nn.init import initialize
from fedpers.nn.layers.base import InitContext, Layer, RunContext, Shape
from fedpers.nn.order import Life

BACKWARD_STEPS = Life.CALC_GRAD | Life.CALC_DERIV


class LifeViolation(AssertionError):
    """A layer touched a tensor at a step its requests did not declare."""


def poison_value(dtype: np.dtype):
    """NaN for floats; 0 for integers (a safe index: a wrong read then shows as a wrong gradient)."""
    return np.nan if np.issubdtype(dtype, np.floating) else 0


@dataclass
class Buffer:
    name: str
    array: np.ndarray
    life: Life  # steps of this layer that may touch it


@dataclass
class LayerRun:
    """One finalized layer with its own buffers; `run` is the RunContext every step sees."""

    layer: Layer
    ctx: InitContext
    out_shape: Shape
    dtype: np.dtype
    run: RunContext
    trains: bool
    alias: bool
    buffers: list[Buffer] = field(default_factory=list)
    strict: bool = True

    # ---- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        layer: Layer,
        input_shapes: Sequence[Shape],
        *,
        dtype: type = np.float64,
        seed: int = 0,
        trains: bool | None = None,
        need_din: Sequence[bool] | bool = True,
        alias: bool = False,
        strict: bool = True,
        kernels: str = "numpy",
        output_kept: bool = False,
        accumulates: bool = False,
    ) -> LayerRun:
        """Finalize `layer` for inputs of `input_shapes` (batch first) and allocate everything it requests.

        alias=True shares the output with input 0 (and din with dout) where the layer allows it
        (ctx.view / ctx.inplace / ctx.deriv_inplace), as the planned graph does. `kernels` picks the
        kernel backend, `output_kept` tells the layer a reader keeps its output (as the graph would).
        """
        dt = np.dtype(dtype)
        shapes = [tuple(s) for s in input_shapes]
        if kernels == "numba" and dt == np.float64:
            from fedpers.nn import jit

            jit.enable_float64()
        ctx = InitContext(layer.name, shapes, shapes[0][0], kernels=kernels, output_kept=output_kept,
                          accumulates=accumulates)
        out_shape = tuple(layer.finalize(ctx))
        if trains is None:
            trains = any(w.trainable for w in ctx.weights) and bool(getattr(layer.spec, "trainable", True))
        if isinstance(need_din, bool):
            need_din = [need_din] * len(shapes)
        rng = np.random.default_rng(seed)

        run = RunContext()
        if layer.State is not None:
            run.state = layer.State(np.random.default_rng([seed, 7]))
        run.inputs = [np.full(s, np.nan, dt) for s in shapes]
        can_alias = alias and (ctx.view or ctx.inplace) and len(shapes) == 1
        can_alias = can_alias and int(np.prod(out_shape)) == int(np.prod(shapes[0]))
        run.aliased = can_alias
        run.out = run.inputs[0].reshape(out_shape) if can_alias else np.full(out_shape, np.nan, dt)
        run.weights = [initialize(rng, w).astype(dt) for w in ctx.weights]
        run.grads = [np.full(w.shape, np.nan, dt) if (trains and w.trainable) else None for w in ctx.weights]
        has_deriv = any(need_din)
        runs = Life.FORWARD | (Life.CALC_GRAD if trains else Life.NONE) | (Life.CALC_DERIV if has_deriv else Life.NONE)
        run.tensors = []
        buffers: list[Buffer] = []
        for r in ctx.scratch:
            life = r.life & runs
            if not life:
                run.tensors.append(None)  # the graph gives no buffer to a tensor no running step touches
                continue
            sdt = dt if np.dtype(r.dtype) == np.float32 else np.dtype(r.dtype)
            arr = np.full(r.shape, poison_value(sdt), sdt)
            run.tensors.append(arr)
            buffers.append(Buffer(f"scratch {r.name}", arr, life))
        run.dout_ = np.full(out_shape, np.nan, dt) if not _is_loss(layer) else None
        run.douts = [] if run.dout_ is None else [run.dout_]
        deriv_alias = can_alias and (ctx.view or ctx.deriv_inplace) and run.dout_ is not None
        run.dins = []
        for i, s in enumerate(shapes):
            if not need_din[i]:
                run.dins.append(None)
            elif deriv_alias and i == 0:
                run.dins.append(run.dout_.reshape(s))
            else:
                run.dins.append(np.full(s, np.nan, dt))
        in_life = Life.FORWARD | (ctx.input_life & runs)
        out_life = Life.FORWARD | (ctx.output_life & runs)
        if can_alias:
            buffers.append(Buffer("input 0 / output", run.inputs[0], in_life | out_life))
            buffers += [Buffer(f"input {i}", x, in_life) for i, x in enumerate(run.inputs) if i > 0]
        else:
            buffers += [Buffer(f"input {i}", x, in_life) for i, x in enumerate(run.inputs)]
            buffers.append(Buffer("output", run.out, out_life))
        return cls(layer, ctx, out_shape, dt, run, trains, can_alias, buffers, strict)

    # ---- steps ----------------------------------------------------------------------------
    def _guarded(self, step: Life, fn: Callable[[], None], results: Sequence[np.ndarray | None]) -> None:
        """Run one step with every buffer it may not touch poisoned; check nothing leaked either way."""
        stashed = []
        if self.strict:
            for b in self.buffers:
                if not (b.life & step):
                    stashed.append((b, b.array.copy()))
                    b.array[...] = poison_value(b.array.dtype)
        fn()
        for b, saved in stashed:
            pv = poison_value(b.array.dtype)
            intact = np.isnan(b.array).all() if np.isnan(pv) else (b.array == pv).all()
            if not intact:
                raise LifeViolation(f"{self.layer.name}: {b.name} was written at {step} outside its life {b.life}")
            b.array[...] = saved
        if self.strict:
            for r in results:
                if r is not None and np.issubdtype(r.dtype, np.floating) and not np.isfinite(r).all():
                    raise LifeViolation(
                        f"{self.layer.name}: step {step} produced non-finite values "
                        "(it read a tensor outside its declared life, or left its result unwritten)"
                    )

    def forward(self, *xs: np.ndarray, training: bool = True) -> np.ndarray:
        """Copy xs into the input buffers, run forward, return a copy of the output."""
        for buf, x in zip(self.run.inputs, xs, strict=True):
            np.copyto(buf, x)
        self._guarded(Life.FORWARD, lambda: self.layer.forward(self.run, training), [self.run.out])
        return self.run.out.copy()

    def backward(self, dout: np.ndarray | None = None,
                 accumulate: bool = False) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
        """calc_gradient (if the layer trains) then calc_derivative; returns copies of (dins, grads).

        A layer that does not train has one backward step (calc-grad = calc-deriv), as in order.assign.
        With `accumulate` (a layer built with accumulates=True) the gradients are added to what the
        grad buffers hold; otherwise they are poisoned first, so a layer must overwrite them.
        """
        run = self.run
        run.accumulate = accumulate
        if dout is not None:
            np.copyto(run.dout_, dout.reshape(run.dout_.shape))
        for d in run.dins:
            if d is not None and not (run.dout_ is not None and np.shares_memory(d, run.dout_)):
                d[...] = np.nan  # written, never accumulated into
        for g in run.grads:
            if g is not None and not accumulate:
                g[...] = np.nan
        if self.trains:
            self._guarded(Life.CALC_GRAD, lambda: self.layer.calc_gradient(run), run.grads)
            self._guarded(Life.CALC_DERIV, lambda: self.layer.calc_derivative(run), run.dins)
        else:

            def both() -> None:
                self.layer.calc_gradient(run)
                self.layer.calc_derivative(run)

            self._guarded(BACKWARD_STEPS, both, run.dins)
        dins = [None if d is None else d.copy() for d in run.dins]
        grads = [None if g is None else g.copy() for g in run.grads]
        return dins, grads

    # ---- helpers for tests ------------------------------------------------------------------
    def weight(self, name: str) -> np.ndarray:
        for req, w in zip(self.ctx.weights, self.run.weights, strict=True):
            if req.name == name:
                return w
        raise KeyError(name)

    def randomize_weights(self, seed: int = 1, scale: float = 1.0) -> None:
        """Replace trainable weights by standard-normal values (zeros/ones hide mistakes in checks)."""
        rng = np.random.default_rng(seed)
        for req, w in zip(self.ctx.weights, self.run.weights, strict=True):
            if req.trainable:
                w[...] = rng.standard_normal(w.shape) * scale


def _is_loss(layer: Layer) -> bool:
    return layer.kind.startswith("loss")


@dataclass
class GradCheck:
    """Largest relative errors between analytic and finite-difference gradients, by tensor name."""

    errors: dict[str, float]

    def worst(self) -> tuple[str, float]:
        return max(self.errors.items(), key=lambda kv: kv[1])


def numeric_grad(f: Callable[[], float], x: np.ndarray, eps: float) -> np.ndarray:
    """Central differences of f with respect to every element of x (perturbed in place, restored)."""
    g = np.zeros(x.shape)
    flat = x.reshape(-1)
    gf = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gf[i] = (fp - fm) / (2 * eps)
    return g


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(1, max |b|): relative for large gradients, absolute for small ones."""
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))) if a.size else 0.0


def check_gradients(
    lr: LayerRun,
    xs: Sequence[np.ndarray],
    *,
    training: bool = True,
    eps: float = 1e-6,
    seed: int = 3,
    objective: Callable[[LayerRun, np.ndarray], float] | None = None,
    before_forward: Callable[[LayerRun], None] | None = None,
) -> GradCheck:
    """Analytic vs central-difference gradients of L (default sum(out * R)) w.r.t. inputs and trainable weights."""
    xs = [np.array(x, dtype=lr.dtype) for x in xs]
    r = np.random.default_rng(seed).standard_normal(lr.out_shape)
    obj = objective or (lambda run, out: float(np.sum(out * r)))

    def loss() -> float:
        if before_forward is not None:
            before_forward(lr)
        out = lr.forward(*xs, training=training)
        return obj(lr, out)

    loss()
    dins, grads = lr.backward(None if _is_loss(lr.layer) else r.astype(lr.dtype))
    errors: dict[str, float] = {}
    for i, x in enumerate(xs):
        if dins[i] is None:
            continue
        errors[f"input {i}"] = rel_error(dins[i], numeric_grad(loss, x, eps))
    for req, w, g in zip(lr.ctx.weights, lr.run.weights, grads, strict=True):
        if g is None:
            continue
        errors[req.name] = rel_error(g, numeric_grad(loss, w, eps))
    return GradCheck(errors)
