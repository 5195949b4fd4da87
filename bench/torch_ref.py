"""PyTorch CPU reference for bench/speed.py and bench/memory.py: the same nets, built from a ModelSpec.

Optional: fedpers does not depend on torch. Run alone to print the speed table:
    python bench/torch_ref.py [--threads N] [--steps 20]
`--memory DATA.npz --model M.ini` trains like `fedpers-client train` and prints the process's RSS
(baseline after imports, data and a warm-up step; peak during training; whole-process peak) as JSON;
`--train-weights W.npz --data DATA.npz --model M.ini --out OUT.npz` trains from fedpers weights
(same names and layouts; dense weights transposed) and writes the trained weights back in fedpers'
layout, for bench/memory.py to compare.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself: speed <-> torch_ref
from fedpers.nn.ini import load_ini  # noqa: E402
from fedpers.nn.spec import LayerSpec, ModelSpec  # noqa: E402

ACT = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "none": nn.Identity}
Shape = tuple[int, int, int]


def _pads(padding: object, size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, ...]:
    """(left, right, top, bottom) zero padding for 'same' / 'valid' / (ph, pw)."""
    if padding is None or padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out = []
        for n, k, s in zip(size, kernel, stride, strict=True):
            total = max((math.ceil(n / s) - 1) * s + k - n, 0)
            out.append((total // 2, total - total // 2))
        (t, b), (l, r) = out
        return (l, r, t, b)
    ph, pw = padding  # type: ignore[misc]
    return (pw, pw, ph, ph)


def _out(n: int, k: int, s: int, p0: int, p1: int) -> int:
    return (n + p0 + p1 - k) // s + 1


def _activation(name: str | None, last: bool, fused_softmax: bool) -> nn.Module:
    if name == "softmax":
        return nn.Identity() if (last and fused_softmax) else nn.Softmax(dim=1)
    return ACT[name or "none"]()


def _layer(spec: LayerSpec, shapes: list[Shape], last: bool, fused: bool) -> tuple[nn.Module, Shape]:
    """One torch module for one LayerSpec, and its output shape (C, H, W) without the batch."""
    c, h, w = shapes[0]
    if spec.type in ("input", "dropout"):
        mod = nn.Dropout(spec.dropout_rate or 0.0) if spec.type == "dropout" else nn.Identity()
        return mod, spec.input_shape if spec.type == "input" else shapes[0]  # type: ignore[return-value]
    if spec.type == "flatten":
        return nn.Flatten(), (1, 1, c * h * w)
    if spec.type == "activation":
        return _activation(spec.activation, last, fused), shapes[0]
    if spec.type == "addition":
        return _activation(spec.activation, last, fused), shapes[0]
    if spec.type == "fully_connected":
        assert spec.unit is not None
        mod = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, spec.unit), _activation(spec.activation, last, fused))
        return mod, (1, 1, spec.unit)
    if spec.type == "batch_normalization":
        eps = spec.epsilon or 1e-3
        mom = 1.0 - (spec.momentum if spec.momentum is not None else 0.99)
        if h == w == 1 or c == h == 1:  # feature vectors: one statistic per feature
            n = c * h * w
            mod: nn.Module = nn.Sequential(
                nn.Flatten(), nn.BatchNorm1d(n, eps=eps, momentum=mom), nn.Unflatten(1, (c, h, w))
            )
        else:
            mod = nn.BatchNorm2d(c, eps=eps, momentum=mom)
        return nn.Sequential(mod, _activation(spec.activation, last, fused)), shapes[0]
    kernel = spec.kernel_size or (1, 1)
    stride = spec.stride or (1, 1)
    if spec.type == "conv2d":
        assert spec.filters is not None
        l, r, t, b = _pads(spec.padding, (h, w), kernel, stride)
        if l == r and t == b:  # symmetric: let the conv pad
            pad, conv = [], nn.Conv2d(c, spec.filters, kernel, stride, padding=(t, l))
        else:
            pad, conv = [nn.ZeroPad2d((l, r, t, b))], nn.Conv2d(c, spec.filters, kernel, stride)
        mod = nn.Sequential(*pad, conv, _activation(spec.activation, last, fused))
        return mod, (spec.filters, _out(h, kernel[0], stride[0], t, b), _out(w, kernel[1], stride[1], l, r))
    if spec.type == "pooling2d":
        if spec.pooling in ("global_max", "global_average"):
            g = nn.AdaptiveMaxPool2d(1) if spec.pooling == "global_max" else nn.AdaptiveAvgPool2d(1)
            return g, (c, 1, 1)
        size = spec.pool_size or (2, 2)
        stride = spec.stride or size
        l, r, t, b = _pads(spec.padding, (h, w), size, stride)
        pool = nn.MaxPool2d(size, stride) if spec.pooling in (None, "max") else nn.AvgPool2d(size, stride)
        pad = [] if (l, r, t, b) == (0, 0, 0, 0) else [nn.ZeroPad2d((l, r, t, b))]
        return nn.Sequential(*pad, pool), (c, _out(h, size[0], stride[0], t, b), _out(w, size[1], stride[1], l, r))
    raise ValueError(f"no torch reference for layer type {spec.type!r}")


class TorchNet(nn.Module):
    """Runs the layers of a ModelSpec in file order over a dict of named outputs (DAGs included)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        fused = spec.loss == "cross"
        self.inputs = [spec.inputs_of(i) for i in range(len(spec.layers))]
        self.mods = nn.ModuleList()
        shapes: dict[str, Shape] = {}
        for i, layer in enumerate(spec.layers):
            ins = [shapes[n] for n in self.inputs[i]] or [layer.input_shape]  # type: ignore[list-item]
            mod, shapes[layer.name] = _layer(layer, ins, i == len(spec.layers) - 1, fused)
            mod.requires_grad_(layer.trainable)
            self.mods.append(mod)
        self.out_shape = shapes[spec.layers[-1].name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: dict[str, torch.Tensor] = {}
        for layer, ins, mod in zip(self.spec.layers, self.inputs, self.mods, strict=True):
            if layer.type == "input":
                y = x
            elif layer.type == "addition":
                y = sum(outs[n] for n in ins)  # type: ignore[assignment]
                y = mod(y)
            else:
                y = mod(outs[ins[0]])
            outs[layer.name] = y
        return outs[self.spec.layers[-1].name]


def build(spec: ModelSpec) -> TorchNet:
    return TorchNet(spec)


def param_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def make_optimizer(spec: ModelSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = spec.optimizer
    if o.type == "adam":
        return torch.optim.Adam(
            params, lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.epsilon, weight_decay=o.weight_decay
        )
    return torch.optim.SGD(params, lr=o.learning_rate, momentum=o.momentum, weight_decay=o.weight_decay)


def loss_fn(spec: ModelSpec, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = out.reshape(out.shape[0], -1)
    if spec.loss == "cross":
        return nn.functional.cross_entropy(out, y)
    return nn.functional.mse_loss(out, nn.functional.one_hot(y, out.shape[1]).to(out.dtype))


def step_seconds(spec: ModelSpec, batch: int, steps: int = 20, warmup: int = 5, seed: int = 0) -> float:
    """Median wall time of one training step (forward, loss, backward, optimizer step) on random data."""
    torch.manual_seed(seed)
    net = build(spec)
    net.train()
    opt = make_optimizer(spec, [p for p in net.parameters() if p.requires_grad])
    c, h, w = spec.layers[0].input_shape  # type: ignore[misc]
    rng = np.random.default_rng(seed)
    classes = int(np.prod(net.out_shape))
    xs = [torch.from_numpy(rng.standard_normal((batch, c, h, w), dtype=np.float32)) for _ in range(4)]
    ys = [torch.from_numpy(rng.integers(0, classes, batch)) for _ in range(4)]
    times = []
    for i in range(warmup + steps):
        x, y = xs[i % 4], ys[i % 4]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(spec, net(x), y)
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        if i >= warmup:
            times.append(t1 - t0)
    return statistics.median(times)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _trim_and_reset() -> int:
    """What fedpers' rss.mark_baseline does: trim the C heap, remember the peak so far, reset it."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _status_kib("VmHWM") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return before


def _batches(n: int, batch: int):
    """fedpers' order without shuffling: consecutive batches, the last one filled from the start."""
    for b in range(-(-n // batch)):
        idx = np.arange(b * batch, (b + 1) * batch) % n
        yield idx


def memory_run(spec: ModelSpec, x: np.ndarray, y: np.ndarray, batch: int) -> dict:
    """Peak RSS of training one epoch, measured as fedpers-client train measures itself."""
    import gc

    warm = build(spec)  # a throwaway model: loads oneDNN's kernels and the allocators' first buffers
    opt = make_optimizer(spec, [p for p in warm.parameters() if p.requires_grad])
    xb, yb = torch.from_numpy(x[:2]), torch.from_numpy(y[:2])
    loss_fn(spec, warm(xb), yb).backward()
    opt.step()
    del warm, opt, xb, yb
    gc.collect()
    startup_peak = _trim_and_reset()
    baseline = _status_kib("VmRSS") * 1024
    torch.manual_seed(0)
    net = build(spec)
    net.train()
    _train_epoch(net, spec, x, y, batch)
    peak = _status_kib("VmHWM") * 1024
    return {"torch": torch.__version__, "baseline": baseline, "peak": peak, "process_peak": max(peak, startup_peak)}


def _train_epoch(net: TorchNet, spec: ModelSpec, x: np.ndarray, y: np.ndarray, batch: int) -> None:
    """One epoch over fedpers' batches with the model file's optimizer."""
    opt = make_optimizer(spec, [p for p in net.parameters() if p.requires_grad])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for idx in _batches(len(x), batch):
        ti = torch.from_numpy(idx)
        opt.zero_grad(set_to_none=True)
        loss_fn(spec, net(xt[ti]), yt[ti]).backward()
        opt.step()


def _to_torch(net: TorchNet, spec: ModelSpec) -> dict[str, tuple[torch.nn.Module, str]]:
    """fedpers weight name -> (torch module, attribute) for conv, dense and batch-norm layers."""
    out = {}
    for layer, mod in zip(spec.layers, net.mods, strict=True):
        for m in mod.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                out[f"{layer.name}.weight"], out[f"{layer.name}.bias"] = (m, "weight"), (m, "bias")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                for ours, theirs in (("gamma", "weight"), ("beta", "bias"), ("running_mean", "running_mean"),
                                     ("running_var", "running_var")):
                    out[f"{layer.name}.{ours}"] = (m, theirs)
    return out


def train_weights(spec: ModelSpec, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                  batch: int) -> dict[str, np.ndarray]:
    """One epoch of fedpers' batches from fedpers' weights; the trained weights in fedpers' layout."""
    net = build(spec)
    where = _to_torch(net, spec)
    with torch.no_grad():
        for name, (m, attr) in where.items():
            w = weights[name]
            getattr(m, attr).copy_(torch.from_numpy(w.T.copy() if isinstance(m, nn.Linear) and w.ndim == 2 else w))
    net.train()
    _train_epoch(net, spec, x, y, batch)
    out = {}
    for name, (m, attr) in where.items():
        w = getattr(m, attr).detach().numpy()
        out[name] = w.T.copy() if isinstance(m, nn.Linear) and w.ndim == 2 else w.copy()
    return out


def main(argv: list[str] | None = None) -> int:
    from speed import MODELS, NETS  # the same nets and batch sizes as the fedpers table

    names = [n for n, _, _ in NETS]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--nets", nargs="+", default=names, choices=names)
    ap.add_argument("--json", action="store_true", help="print one JSON object (for bench/speed.py)")
    ap.add_argument("--memory", metavar="DATA.npz", help="measure training RSS on this data (with --model)")
    ap.add_argument("--train-weights", metavar="W.npz", help="train from these fedpers weights (with --data, --out)")
    ap.add_argument("--model", metavar="M.ini")
    ap.add_argument("--data", metavar="DATA.npz")
    ap.add_argument("--out", metavar="OUT.npz")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="override the model's learning rate")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory or args.train_weights:
        spec = load_ini(args.model)
        if args.lr is not None:
            spec = spec.with_changes(optimizer=replace(spec.optimizer, learning_rate=args.lr))
        batch = args.batch or spec.batch_size
        with np.load(args.memory or args.data) as d:
            x, y = d["x"].astype(np.float32), d["y"].astype(np.int64)
        if args.memory:
            print(json.dumps(memory_run(spec, x, y, batch)))
            return 0
        with np.load(args.train_weights) as w:
            weights = {k: w[k] for k in w.files}
        np.savez(args.out, **train_weights(spec, weights, x, y, batch))
        return 0
    seconds, params = {}, {}
    for name, file, batch in NETS:
        if name in args.nets:
            spec = load_ini(MODELS / file)
            seconds[name] = step_seconds(spec, batch, steps=args.steps, warmup=args.warmup)
            params[name] = param_count(build(spec))
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": args.threads, "seconds": seconds}))
        return 0
    print(f"torch {torch.__version__} CPU, {args.threads} threads, median of {args.steps} steps")
    print(f"{'net':<12} {'batch':>5} {'ms/step':>9} {'params':>10}")
    for name, _, batch in NETS:
        if name in seconds:
            print(f"{name:<12} {batch:>5} {seconds[name] * 1e3:>9.2f} {params[name]:>10,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
