"""Memory: the device process against PyTorch, and every net's arena per memory mode.

Table 1 -- VGG-small, batch 32, plain SGD, one epoch -- runs each configuration in its own
`fedpers-client train --json` process and PyTorch (bench/torch_ref.py --memory) in a child of an
interpreter that has torch (--torch-python, $FEDPERS_TORCH_PYTHON or this one), both measured the
same way: training growth = peak RSS while training - RSS after imports, data and a warm-up step
(heap trimmed); whole-process peak = the process's RSS high-water mark over its whole life.
Ratios are fedpers / PyTorch. Then the weights after that epoch in swap-all + micro-batch 8 are
compared with PyTorch's from the same initial weights and batches.
Table 2 -- every shipped net -- is the plan alone (no process): arena, lower bound, swap I/O.

Run: .venv/bin/python bench/memory.py [--steps 12] [--no-torch] [--torch-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself

from fedpers.nn import init_weights, load_ini  # noqa: E402
from fedpers.nn.graph import compile as compile_graph  # noqa: E402
from fedpers.nn.optim import Optimizer  # noqa: E402
from quiet import OtherCpu  # noqa: E402
from speed import torch_python  # noqa: E402

MIB = 1 << 20
MODELS = ROOT / "common" / "models"
VGG, VGG_BATCH = "vgg_small.ini", 32
CONFIGS = [  # label, fedpers-client train flags
    ("planned", ["--memory", "planned"]),
    ("swap", ["--memory", "swap"]),
    ("swap + micro-batch 8", ["--memory", "swap", "--micro-batch", "8"]),
    ("swap-all + micro-batch 8", ["--memory", "swap-all", "--micro-batch", "8"]),
    ("swap-all + micro-batch 32", ["--memory", "swap-all", "--micro-batch", "32"]),
    ("planned, numba kernels", ["--memory", "planned", "--kernels", "numba"]),
]
NETS = {  # name: (model file, batch)
    "mlp": ("mlp.ini", 64),
    "lenet5": ("lenet5.ini", 32),
    "digits_cnn": ("digits_cnn.ini", 32),
    "vgg_small": ("vgg_small.ini", 32),
    "vgg_small_frozen": ("vgg_small_frozen.ini", 32),
}
PLANS = [  # label, mode, micro-batch
    ("naive", "naive", 1), ("planned", "planned", 1), ("swap", "swap", 1), ("swap+micro4", "swap", 4),
    ("swap-all", "swap-all", 1), ("swap-all+micro4", "swap-all", 4), ("swap-all+micro8", "swap-all", 8),
]


def make_data(spec, batch: int, steps: int, path: Path) -> None:
    """steps batches of random examples, and one batch held out (so evaluation is a small step)."""
    rng = np.random.default_rng(0)
    shape = spec.layers[0].input_shape
    n = batch * steps
    classes = spec.layers[-1].unit
    np.savez(path, x=rng.standard_normal((n, *shape)).astype(np.float32), y=rng.integers(0, classes, n),
             x_test=rng.standard_normal((batch, *shape)).astype(np.float32), y_test=rng.integers(0, classes, batch))


def fedpers_run(model: Path, data: Path, batch: int, flags: list[str], extra: list[str] = ()) -> dict:
    cmd = [sys.executable, "-m", "fedpers.client", "train", str(model), "--data", str(data), "--epochs", "1",
           "--batch", str(batch), "--no-shuffle", "--json", *flags, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def torch_run(python: str, *args: str) -> dict | None:
    cmd = [python, str(ROOT / "bench" / "torch_ref.py"), "--threads", str(os.cpu_count() or 1), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"PyTorch reference failed: {proc.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def ratio(a: float, b: float | None) -> str:
    return f"1/{b / a:.1f}" if b and a else "-"


def device_table(steps: int, python: str | None, tmp: Path) -> None:
    model = MODELS / VGG
    spec = load_ini(model)
    data = tmp / "vgg.npz"
    make_data(spec, VGG_BATCH, steps, data)
    ref = torch_run(python, "--memory", str(data), "--model", str(model), "--batch", str(VGG_BATCH)) if python else None
    print(f"VGG-small, batch {VGG_BATCH}, SGD, one epoch of {steps} steps: RSS of the training process "
          "(MiB; ratio = fedpers / PyTorch)")
    head = (f"{'':<28} {'arena':>7} {'training growth':>16} {'ratio':>7} {'process peak':>13} {'ratio':>7} "
            f"{'ms/step':>8} {'vs planned':>10}")
    print(head)
    print("-" * len(head))
    if ref:
        growth, peak = (ref["peak"] - ref["baseline"]) / MIB, ref["process_peak"] / MIB
        print(f"{'PyTorch ' + ref['torch'] + ' CPU':<28} {'':>7} {growth:>16.1f} {'':>7} {peak:>13.1f}")
    planned_ms = None
    for label, flags in CONFIGS:
        try:
            rep = fedpers_run(model, data, VGG_BATCH, flags)
        except SystemExit as e:
            print(f"{label:<28} failed: {str(e).splitlines()[-1]}")
            continue
        mem = rep["memory"]
        growth = (mem["rss_peak_bytes"] - mem["rss_baseline_bytes"]) / MIB
        peak = mem["rss_process_peak_bytes"] / MIB
        ms = rep["step_seconds"] * 1e3
        if label == "planned":
            planned_ms = ms
        vs = f"{(ms / planned_ms - 1) * 100:+.0f}%" if planned_ms and label != "planned" else ""
        rg = ratio(growth, (ref["peak"] - ref["baseline"]) / MIB) if ref else "-"
        rp = ratio(peak, ref["process_peak"] / MIB) if ref else "-"
        print(f"{label:<28} {mem['arena_bytes'] / MIB:>7.1f} {growth:>16.1f} {rg:>7} {peak:>13.1f} {rp:>7} "
              f"{ms:>8.0f} {vs:>10}", flush=True)
    print("training growth = peak RSS while training - RSS after imports, data and warm-up; process peak = "
          "the high-water mark of the whole process (start-up included); arena = the trainer's planned bytes")
    if python:
        weights_check(model, spec, data, python, tmp)


CHECK_LR = 1e-4  # random data at the model's 0.01 diverges (loss 2.3 -> 24 in four steps): any rounding explodes


def weights_check(model: Path, spec, data: Path, python: str, tmp: Path) -> None:
    """swap-all + micro-batch 8 against PyTorch from the same initial weights and batches, at a
    learning rate where training does not diverge."""
    init, ours, theirs = tmp / "init.npz", tmp / "ours.npz", tmp / "theirs.npz"
    np.savez(init, **init_weights(spec, seed=0))
    fedpers_run(model, data, VGG_BATCH, ["--memory", "swap-all", "--micro-batch", "8", "--lr", str(CHECK_LR)],
                ["--init-weights", str(init), "--save-weights", str(ours)])
    if torch_run(python, "--train-weights", str(init), "--data", str(data), "--model", str(model),
                 "--batch", str(VGG_BATCH), "--lr", str(CHECK_LR), "--out", str(theirs)) is None:
        return
    with np.load(ours) as a, np.load(theirs) as b, np.load(init) as w0:
        scale = max(float(np.abs(b[k]).max()) for k in b.files)
        worst = max(float(np.abs(a[k] - b[k]).max()) for k in b.files) / scale
        moved = max(float(np.abs(b[k] - w0[k]).max()) for k in b.files) / scale
    print(f"weights after the epoch (lr {CHECK_LR:g}), swap-all + micro-batch 8 vs PyTorch from the same start: "
          f"largest |difference| {worst:.1e} of the largest weight (training moved weights by up to {moved:.1e})")


def plan_table() -> None:
    print(f"\n{'net':<17} {'config':<16} {'arena':>9} {'lower bd':>9} {'a/lb':>5} {'a/naive':>7} "
          f"{'swap I/O/iter':>13}")
    for name, (file, batch) in NETS.items():
        spec = load_ini(MODELS / file)
        slots = Optimizer(spec.optimizer).slots
        naive = None
        for label, mode, micro in PLANS:
            c = compile_graph(spec, batch, mode=mode, micro_batch=micro, optimizer_slots=slots, allocate=False)
            naive = naive or c.plan.total
            io = sum(it.nbytes for it in c.swap_items) * micro
            print(f"{name:<17} {label:<16} {c.plan.total / MIB:>8.2f}M {c.lower_bound_bytes / MIB:>8.2f}M "
                  f"{c.plan.total / c.lower_bound_bytes:>5.2f} {c.plan.total / naive:>7.2f} {io / MIB:>12.2f}M")
    print("arena = planned bytes incl. weights, gradients, optimizer state (what is in memory at once); lower "
          "bd = most bytes live at one step in that mode; swap I/O = bytes written or read per batch, at most")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--torch-python", help="interpreter with torch (default: $FEDPERS_TORCH_PYTHON or this one)")
    args = ap.parse_args()
    python = None if args.no_torch else torch_python(args.torch_python)
    quiet = OtherCpu.start()
    with tempfile.TemporaryDirectory() as tmp:
        device_table(args.steps, python, Path(tmp))
    print(quiet.stop().describe() + "  (memory columns do not depend on it; step times do)")
    plan_table()
    if python is None and not args.no_torch:
        print("PyTorch columns need torch: see README (FEDPERS_TORCH_PYTHON)")


if __name__ == "__main__":
    main()
