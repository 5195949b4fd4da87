"""Where a device process's fixed memory goes: resident size (VmRSS) import by import, and per
kernel module for each kernel backend.

Every chain of steps runs in a fresh interpreter (`python bench/footprint.py --child STEPS`), which
reports its RSS after each step; the tables show the RSS and what each step added. A step is an
import or a line of code (the first BLAS product, the first encode, ...).
Run: .venv/bin/python bench/footprint.py [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MIB = 1 << 20
GEMM = "import numpy as np; a = np.ones((512, 512), np.float32); a @ a"
DEVICE = [  # what `fedpers-client run` loads, in order
    ("python interpreter", ""),
    ("numpy", "import numpy"),
    ("first BLAS product (OpenBLAS buffers)", GEMM),
    ("the trainer: fedpers.nn.trainer", "import fedpers.nn.trainer"),
    ("VGG-small's layers (numpy kernels)", "from fedpers.nn.layers import LAYERS; [LAYERS[k] for k in "
     "('input', 'conv2d', 'pooling2d', 'activation', 'flatten', 'fully_connected')]; "
     "import fedpers.nn.layers.loss"),
    ("codec + first int2 encode", "import numpy as np, fedpers.codec as c; c.encode('int2+zstd', np.ones(999, "
     "np.float32))"),
    ("grpc + protobuf + fedpers.client.agent", "import fedpers.client.agent"),
]
JIT = ["kernels", "window", "rng", "conv2d", "pooling2d", "activation", "batch_normalization", "dropout", "loss",
       "optim"]
NUMPY_MODULES = ["conv2d", "pooling2d", "activation", "batch_normalization", "dropout", "fully_connected", "loss"]
BASE = [("numpy, BLAS, trainer", f"{GEMM}; import fedpers.nn.trainer")]


def child(steps: list[str]) -> list[int]:
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    out = []
    for code in steps:
        if code:
            exec(code, {})
        out.append(rss())
    return out


def run_chain(steps: list[tuple[str, str]]) -> list[tuple[str, int, int]]:
    """(label, RSS after, added) per step, in a fresh interpreter."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([c for _, c in steps])],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"footprint child failed:\n{proc.stderr}")
    sizes = json.loads(proc.stdout)
    rows, prev = [], 0
    for (label, _), size in zip(steps, sizes, strict=True):
        rows.append((label, size, size - prev))
        prev = size
    return rows


def print_rows(title: str, rows: list[tuple[str, int, int]], skip: int = 0) -> None:
    print(title)
    print(f"  {'step':<46} {'RSS MiB':>8} {'added':>8}")
    for label, size, added in rows[skip:]:
        print(f"  {label:<46} {size / MIB:>8.1f} {added / MIB:>+8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print the tables as one JSON object")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    device = run_chain(DEVICE)
    numpy_layers = run_chain(BASE + [(f"fedpers.nn.layers.{m}", f"import fedpers.nn.layers.{m}")
                                     for m in NUMPY_MODULES])
    jit = run_chain(BASE + [("llvmlite (LLVM)", "import llvmlite.binding"), ("numba", "import numba")]
                    + [(f"fedpers.nn.jit.{m} (float32)", f"import fedpers.nn.jit.{m}") for m in JIT]
                    + [("float64 variants of all of them", "from fedpers.nn import jit; jit.enable_float64()")])
    if args.json:
        print(json.dumps({"device": device, "numpy_layers": numpy_layers, "numba": jit}))
        return
    print_rows("A device process (`fedpers-client run`), import by import, each step in the same fresh interpreter:",
               device)
    print_rows("\nKernel modules, numpy backend (after numpy, BLAS and the trainer):", numpy_layers, skip=1)
    print_rows("\nKernel modules, numba backend (after numpy, BLAS and the trainer; cached, float32 only "
               "until the gradient checks ask for float64):", jit, skip=1)
    total = sum(added for _, _, added in jit[1:-1])
    print(f"  numba backend in all: {total / MIB:+.1f} MiB before its float64 variants")


if __name__ == "__main__":
    main()
