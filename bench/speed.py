"""Median training-step time of the fedpers trainer on three reference nets, next to PyTorch CPU.

Run with `make bench` or `python bench/speed.py [--steps 20] [--warmup 3] [--no-torch] [--torch-python PY]`.
Each net trains on random data with `Trainer(spec, memory="planned")`; the table shows the median
seconds per step the trainer itself reports (FitResult.step_seconds) over the timed steps, after a
warm-up fit that compiles or loads every numba kernel and the plan. The same nets are then timed in
PyTorch (bench/torch_ref.py, in a child process so the two thread pools never share the cores) with
the same thread count, and the ratio fedpers / torch is shown. torch is not a fedpers dependency: the
child runs under this interpreter if it can import torch, or under --torch-python / $FEDPERS_TORCH_PYTHON
(for example a separate venv holding torch).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself: speed <-> torch_ref
from fedpers.nn.graph import param_count  # noqa: E402
from fedpers.nn.ini import load_ini  # noqa: E402
from fedpers.nn.spec import ModelSpec  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "common" / "models"
# (table name, model file, batch size)
NETS: tuple[tuple[str, str, int], ...] = (
    ("mlp", "mlp.ini", 64),
    ("lenet5", "lenet5.ini", 32),
    ("vgg_small", "vgg_small.ini", 32),
)
TORCH_HINT = "torch not installed: pip install torch==2.13.0 (CPU wheel on this machine)"

log = logging.getLogger("bench.speed")


@dataclass
class Row:
    net: str
    batch: int
    ms: float
    params: int
    threads: int
    torch_ms: float | None = None


def threads() -> int:
    """Threads the trainer may use: numba's pool size (BLAS follows OMP/OPENBLAS settings, by default the cores)."""
    try:
        import numba

        return int(numba.get_num_threads())
    except Exception:  # numba missing or not initialised: fall back to the cores
        return os.cpu_count() or 1


def busy_note(seconds: float = 1.0) -> str | None:
    """A warning line when other processes use the cores right now (timings would partly measure them).

    Samples /proc/stat over `seconds` (the load average would also count this script's previous runs).
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    busy = 1.0 - (idle1 - idle0) / max(total1 - total0, 1)
    if busy > 0.15:
        return (
            f"WARNING: the cores were {busy:.0%} busy before the run: other processes share them, timings are inflated"
        )
    return None


def random_data(spec: ModelSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    c, h, w = spec.layers[0].input_shape  # type: ignore[misc]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    if (c, h) == (1, 1):
        x = x.reshape(n, w)  # 1:1:F inputs take (N, F)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y


def time_fedpers(spec: ModelSpec, batch: int, steps: int, warmup: int) -> float:
    """Median seconds per step reported by the trainer, after a warm-up fit on the same Trainer."""
    from fedpers.nn import Trainer

    trainer = Trainer(spec, memory="planned", seed=0)
    try:
        x, y = random_data(spec, batch * max(warmup, 1))  # compiles kernels and the plan for this batch
        trainer.fit(x, y, epochs=1, batch_size=batch, shuffle=False, progress=None)
        x, y = random_data(spec, batch * steps, seed=1)
        result = trainer.fit(x, y, epochs=1, batch_size=batch, shuffle=False, progress=None)
    finally:
        trainer.close()
    if result.steps != steps:
        log.warning("trainer ran %d steps, expected %d", result.steps, steps)
    return float(result.step_seconds)


def torch_python(explicit: str | None) -> str | None:
    """An interpreter that can import torch: --torch-python, $FEDPERS_TORCH_PYTHON, or this one."""
    for candidate in (explicit, os.environ.get("FEDPERS_TORCH_PYTHON"), sys.executable):
        if not candidate:
            continue
        probe = subprocess.run([candidate, "-c", "import torch"], capture_output=True)
        if probe.returncode == 0:
            return candidate
        if candidate != sys.executable:
            log.warning("%s cannot import torch", candidate)
    return None


def time_torch(python: str, nets: list[str], steps: int, warmup: int, n_threads: int) -> dict:
    """Run bench/torch_ref.py in a child process; returns its JSON ({torch, threads, seconds: {net: s}})."""
    cmd = [
        python,
        str(Path(__file__).resolve().parent / "torch_ref.py"),
        "--json",
        "--threads",
        str(n_threads),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--nets",
        *nets,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def table(rows: list[Row], torch_version: str | None) -> str:
    head = f"{'net':<10} {'batch':>5} {'ms/step':>9} {'params':>11} {'threads':>7}"
    if torch_version:
        head += f" {'torch ms':>9} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r.net:<10} {r.batch:>5} {r.ms:>9.2f} {r.params:>11,} {r.threads:>7}"
        if torch_version and r.torch_ms is not None:
            line += f" {r.torch_ms:>9.2f} {r.ms / r.torch_ms:>5.2f}x"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="median training-step time, fedpers vs PyTorch CPU")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per net (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps before timing (default 3)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--torch-python", help="interpreter with torch for the reference (default: this one)")
    names = [n for n, _, _ in NETS]
    ap.add_argument("--nets", nargs="+", default=names, choices=names, help="which nets (default: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    n_threads = threads()
    busy = busy_note()
    rows, failed = [], []
    for name, file, batch in NETS:
        if name not in args.nets:
            continue
        spec = load_ini(MODELS / file)
        try:
            ms = time_fedpers(spec, batch, args.steps, args.warmup) * 1e3
        except Exception:
            log.exception("%s: the fedpers trainer failed", name)
            failed.append(name)
            ms = math.nan
        rows.append(Row(name, batch, ms, param_count(spec), n_threads))
        print(f"  fedpers {name}: {ms:.2f} ms/step", file=sys.stderr, flush=True)

    torch_version = None
    python = None if args.no_torch else torch_python(args.torch_python)
    if python:
        try:
            ref = time_torch(python, [r.net for r in rows], args.steps, args.warmup, n_threads)
        except RuntimeError as e:
            log.error("%s", e)
            failed.append("torch reference")
            ref = {"torch": None, "seconds": {}}
        torch_version = ref["torch"]
        for r in rows:
            r.torch_ms = ref["seconds"].get(r.net, math.nan) * 1e3

    print(
        f"fedpers training step (forward, backward, optimizer), median of {args.steps} steps after "
        f"{args.warmup} warm-up, float32, memory=planned"
    )
    print(table(rows, torch_version))
    if torch_version:
        print(
            f"torch {torch_version} CPU, torch.set_num_threads({n_threads}), same nets and batch; "
            "ratio = fedpers / torch (lower is better)"
        )
    elif not args.no_torch:
        print(TORCH_HINT)
    if busy:
        print(busy)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
