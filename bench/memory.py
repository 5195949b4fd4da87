"""Memory benchmark: arena bytes per mode against the lower bound, RSS growth and step time.

Each (net, mode) trains in its own process through `fedpers-client train --json`, so RSS figures
are that process's own: growth = VmHWM after training - RSS after imports, data and kernel warm-up.
Run: .venv/bin/python bench/memory.py [--steps N] [--nets mlp,lenet5,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from fedpers.nn import load_ini  # noqa: E402
from fedpers.nn.budget import format_size  # noqa: E402
from fedpers.nn.graph import compile as compile_graph  # noqa: E402
from fedpers.nn.optim import Optimizer  # noqa: E402

NETS = {  # name: (model file, batch)
    "mlp": ("mlp.ini", 64),
    "lenet5": ("lenet5.ini", 32),
    "vgg_small": ("vgg_small.ini", 32),
    "vgg_small_frozen": ("vgg_small_frozen.ini", 32),
}
CONFIGS = [  # label, mode, lookahead, micro-batch
    ("naive", "naive", 2, 1),
    ("planned", "planned", 2, 1),
    ("swap", "swap", 2, 1),
    ("swap+micro4", "swap", 2, 4),
]


def make_data(spec, batch: int, steps: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    n = batch * steps
    x = rng.standard_normal((n, *spec.layers[0].input_shape)).astype(np.float32)
    classes = spec.layers[-1].unit
    np.savez(path, x=x, y=rng.integers(0, classes, n))


def run(model: Path, data: Path, batch: int, mode: str, lookahead: int, micro: int) -> dict:
    cmd = [sys.executable, "-m", "fedpers.client", "train", str(model), "--data", str(data), "--epochs", "1",
           "--batch", str(batch), "--memory", mode, "--lookahead", str(lookahead), "--micro-batch", str(micro),
           "--no-shuffle", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="training steps per run (median step time)")
    ap.add_argument("--nets", default=",".join(NETS), help="comma list of: " + ", ".join(NETS))
    args = ap.parse_args()
    mib = 1024 * 1024
    print(f"{'net':<17} {'config':<12} {'arena':>9} {'lower bd':>9} {'a/lb':>5} {'a/naive':>7} "
          f"{'rss grow':>9} {'ms/step':>8} {'swap ovh':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets.split(","):
            file, batch = NETS[name]
            model = ROOT / "common" / "models" / file
            spec = load_ini(model)
            data = Path(tmp) / f"{name}.npz"
            make_data(spec, batch, args.steps, data)
            naive_bytes = planned_ms = None
            for label, mode, la, micro in CONFIGS:
                c = compile_graph(spec, batch, mode=mode, lookahead=la, micro_batch=micro,
                                  optimizer_slots=Optimizer(spec.optimizer).slots, allocate=False)
                rep = run(model, data, batch, mode, la, micro)
                mem = rep["memory"]
                naive_bytes = naive_bytes or c.plan.total
                ms = rep["step_seconds"] * 1e3
                if label == "planned":
                    planned_ms = ms
                overhead = f"{(ms / planned_ms - 1) * 100:+.0f}%" if planned_ms and mode == "swap" else ""
                growth = mem["rss_peak_bytes"] - mem["rss_baseline_bytes"]
                print(f"{name:<17} {label:<12} {c.plan.total / mib:>8.1f}M {c.lower_bound_bytes / mib:>8.1f}M "
                      f"{c.plan.total / c.lower_bound_bytes:>5.2f} {c.plan.total / naive_bytes:>7.2f} "
                      f"{growth / mib:>8.1f}M {ms:>8.1f} {overhead:>8}", flush=True)
    print(f"\narena = planned bytes incl. weights, gradients, optimizer state; lower bd = most bytes live at once "
          f"in that mode; rss grow = peak - baseline RSS of the training process ({format_size(mib)} = 1M).")


if __name__ == "__main__":
    main()
