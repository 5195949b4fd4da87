"""Median training-step time of the fedpers trainer on three reference nets, next to PyTorch CPU.

Run with `make bench` or `python bench/speed.py [--steps 20] [--warmup 3] [--repeats 3] [--no-torch]
[--torch-python PY]`. Each net trains on random data with the numpy kernels, with the numba kernels,
and with the numpy kernels in micro-batches of 4 (memory=planned); the table shows the median
seconds per step the trainer itself reports (FitResult.step_seconds), after a warm-up fit that loads
every kernel and the plan, the best median of `--repeats` interleaved runs. The same nets are timed
in PyTorch (bench/torch_ref.py, in a child process so the two thread pools never share the cores)
with the same thread count; ratio = the faster fedpers backend / torch. torch is not a fedpers
dependency: the child runs under this interpreter if it can import torch, or under --torch-python /
$FEDPERS_TORCH_PYTHON (for example a separate venv holding torch).

Timings on a loaded machine measure the other processes too: when other processes used more than a
quarter of a core on average during the run (bench/quiet.py: the machine's busy CPU time minus the
benchmark's own), the ratios are printed marked `noisy` (take the table on a quiet machine).

The fedpers side runs in child processes so that the BLAS can differ: numpy's OpenBLAS picks its
kernels at load time and OPENBLAS_CORETYPE overrides it. When the environment sets it, the table
has the nets twice: as the environment says, and with OpenBLAS's own choice for this CPU (the
variable removed); the BLAS core type each ran is printed. (On the machine this was written on,
OPENBLAS_CORETYPE=Haswell forced AVX2 kernels on an AVX-512 CPU: sgemm at ~115 instead of ~205
GFLOP/s per core, while PyTorch's oneDNN is not affected.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself: speed <-> torch_ref
from fedpers.nn.graph import param_count  # noqa: E402
from fedpers.nn.ini import load_ini  # noqa: E402
from fedpers.nn.layers.kernels import numba_available  # noqa: E402
from fedpers.nn.spec import ModelSpec  # noqa: E402
from quiet import OtherCpu  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "common" / "models"
# (table name, model file, batch size)
NETS: tuple[tuple[str, str, int], ...] = (
    ("mlp", "mlp.ini", 64),
    ("lenet5", "lenet5.ini", 32),
    ("vgg_small", "vgg_small.ini", 32),
)
RUNS = (("numpy", "numpy", 1), ("numba", "numba", 1), ("numpy μb4", "numpy", 4))  # column, kernels, micro-batch
TORCH_HINT = "torch not installed: pip install torch==2.13.0 (CPU wheel on this machine)"

log = logging.getLogger("bench.speed")


@dataclass
class Row:
    net: str
    batch: int
    params: int
    threads: int
    ms: dict[str, float] = field(default_factory=dict)
    torch_ms: float | None = None


def threads() -> int:
    """Threads BLAS uses (OpenBLAS follows the cores unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS say)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.cpu_count() or 1


def random_data(spec: ModelSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    c, h, w = spec.layers[0].input_shape  # type: ignore[misc]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    if (c, h) == (1, 1):
        x = x.reshape(n, w)  # 1:1:F inputs take (N, F)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y


def fedpers_trainer(spec: ModelSpec, batch: int, warmup: int, kernels: str, micro: int):
    """A Trainer with its kernels and plan warm (one fit of `warmup` steps)."""
    from fedpers.nn import Trainer

    trainer = Trainer(spec, memory="planned", seed=0, kernels=kernels, micro_batch=micro)
    x, y = random_data(spec, batch * max(warmup, 1))
    trainer.fit(x, y, epochs=1, batch_size=batch, shuffle=False, progress=None)
    return trainer


def time_fit(trainer, spec: ModelSpec, batch: int, steps: int) -> float:
    """Median seconds per step the trainer reports over one fit of `steps` steps."""
    x, y = random_data(spec, batch * steps, seed=1)
    result = trainer.fit(x, y, epochs=1, batch_size=batch, shuffle=False, progress=None)
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
    cmd = [python, str(Path(__file__).resolve().parent / "torch_ref.py"), "--json", "--threads", str(n_threads),
           "--steps", str(steps), "--warmup", str(warmup), "--nets", *nets]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def blas_coretype() -> str:
    """The core type numpy's OpenBLAS runs (threadpoolctl's report), or what the environment forces."""
    try:
        from threadpoolctl import threadpool_info

        for lib in threadpool_info():
            if lib.get("internal_api") == "openblas":
                return str(lib.get("architecture"))
    except ImportError:
        pass
    return os.environ.get("OPENBLAS_CORETYPE", "OpenBLAS's own choice")


def fedpers_rows(args, runs) -> tuple[list[Row], list[str]]:
    """Time every net and run in this process."""
    n_threads = threads()
    rows, failed = [], []
    for name, file, batch in NETS:
        if name not in args.nets:
            continue
        spec = load_ini(MODELS / file)
        row = Row(name, batch, param_count(spec), n_threads)
        trainers = {}
        for label, kernels, micro in runs:
            try:
                trainers[label] = fedpers_trainer(spec, batch, args.warmup, kernels, micro)
            except Exception:
                log.exception("%s: the fedpers trainer (%s) failed", name, label)
                failed.append(f"{name} {label}")
        best = {label: math.inf for label in trainers}
        for _ in range(args.repeats):  # interleaved, so a busy spell hits every column alike
            for label, trainer in trainers.items():
                best[label] = min(best[label], time_fit(trainer, spec, batch, args.steps) * 1e3)
        for trainer in trainers.values():
            trainer.close()
        row.ms = best
        rows.append(row)
    return rows, failed


def fedpers_child(args, env: dict[str, str]) -> tuple[str, list[Row], list[str]]:
    """fedpers_rows in a child process with environment `env`: (BLAS core type, rows, failures)."""
    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--nets", *args.nets]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
    out = json.loads(done.stdout)
    return out["blas"], [Row(**r) for r in out["rows"]], out["failed"]


def table(rows: list[Row], columns: list[str], torch_version: str | None, noisy: bool) -> str:
    head = f"{'net':<10} {'batch':>5} {'params':>10} {'threads':>7}" + "".join(f" {c:>10}" for c in columns)
    if "numpy μb4" in columns:
        head += f" {'μb cost':>8}"
    if torch_version:
        head += f" {'torch ms':>9} {'ratio':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r.net:<10} {r.batch:>5} {r.params:>10,} {r.threads:>7}"
        line += "".join(f" {r.ms.get(c, math.nan):>10.2f}" for c in columns)
        if "numpy μb4" in columns:
            line += f" {(r.ms['numpy μb4'] / r.ms['numpy'] - 1) * 100:>+7.0f}%"
        if torch_version and r.torch_ms is not None:
            best = min(v for k, v in r.ms.items() if k in ("numpy", "numba"))
            ratio = f"{best / r.torch_ms:.2f}x" + (" noisy" if noisy else "")
            line += f" {r.torch_ms:>9.2f} {ratio:>12}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="median training-step time, fedpers vs PyTorch CPU")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps before timing (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration; best median kept")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--torch-python", help="interpreter with torch for the reference (default: this one)")
    names = [n for n, _, _ in NETS]
    ap.add_argument("--nets", nargs="+", default=names, choices=names, help="which nets (default: all)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    n_threads = threads()
    runs = [r for r in RUNS if r[1] != "numba" or numba_available()]
    columns = [label for label, _, _ in runs]
    if args.child:
        rows, failed = fedpers_rows(args, runs)
        print(json.dumps({"blas": blas_coretype(), "rows": [r.__dict__ for r in rows], "failed": failed}))
        return 0
    quiet = OtherCpu.start()
    variants = [("environment", dict(os.environ))]
    if "OPENBLAS_CORETYPE" in os.environ:
        variants.append(("OpenBLAS's own choice", {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}))
    results, failed = [], []
    for label, env in variants:
        try:
            blas, rows, bad = fedpers_child(args, env)
        except RuntimeError as e:
            log.error("%s", e)
            failed.append(f"fedpers ({label})")
            continue
        failed += bad
        results.append((label, blas, rows))
        for r in rows:
            print(f"  fedpers {r.net} (BLAS {blas}): " + ", ".join(f"{k} {v:.2f} ms" for k, v in r.ms.items()),
                  file=sys.stderr, flush=True)
    rows = [r for _, _, rs in results for r in rs]

    torch_version = None
    python = None if args.no_torch else torch_python(args.torch_python)
    if python:
        try:
            refs = [time_torch(python, list(dict.fromkeys(r.net for r in rows)), args.steps, args.warmup, n_threads)
                    for _ in range(args.repeats)]
            torch_version = refs[0]["torch"]
            for r in rows:
                r.torch_ms = min(ref["seconds"].get(r.net, math.nan) for ref in refs) * 1e3
        except RuntimeError as e:
            log.error("%s", e)
            failed.append("torch reference")

    quiet.stop()
    noisy = quiet.noisy
    print(f"training step (forward, backward, optimizer), float32, memory=planned: best of {args.repeats} "
          f"medians of {args.steps} steps after {args.warmup} warm-up; ms")
    for label, blas, rs in results:
        env_note = f" (OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']})" if label == "environment" and \
            "OPENBLAS_CORETYPE" in os.environ else ""
        print(f"BLAS: numpy's OpenBLAS, core type {blas} -- {label}{env_note}")
        print(table(rs, columns, torch_version, noisy))
    if torch_version:
        print(f"torch {torch_version} CPU, torch.set_num_threads({n_threads}), same nets and batch; "
              "ratio = the faster fedpers backend / torch (lower is better)")
    elif not args.no_torch:
        print(TORCH_HINT)
    print("μb cost = the numpy kernels in 4 micro-batches against whole batches")
    print(quiet.describe())
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
