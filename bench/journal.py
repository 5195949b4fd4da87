"""What "durable before acknowledged" costs: bytes and time the journal adds per accepted update.

    python bench/journal.py [--dir DIR] [--n 30]

For a few update sizes (the ~1M-parameter model of bench/load.py in fp32 and int8, the demo CNN's
shared layers in fp32), writes N journal records with the server's own `Journal.append` (temp file
+ fsync + rename + directory fsync) into DIR (default: a temp dir on the disk that holds /tmp;
point it at the real store's disk to measure that one) and prints bytes written per update and
p50/p99 milliseconds. The server does this outside its lock, in parallel with other uploads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

SIZES = {  # name -> (float32 values, codec)
    "mlp_1m fp32": (1_066_240, "fp32"),
    "mlp_1m int8": (1_066_240, "int8"),
    "digits_cnn shared fp32": (4_864, "fp32"),  # the demo model's shared tensors
}


def make_blob(values: int, codec_name: str, seed: int = 0) -> bytes:
    from fedpers import codec, wire

    arr = (1e-3 * np.random.default_rng(seed).standard_normal(values)).astype(np.float32)
    payload, _ = codec.encode(codec_name, arr)
    return wire.tensorset_to_blob([wire.encoded_to_wire("w", arr.shape, codec_name, payload)])


def main(argv: list[str] | None = None) -> int:
    from fedpers import wire
    from fedpers.server.journal import Journal, JournalRecord

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--n", type=int, default=30, help="records per size (default 30)")
    ns = ap.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"journal cost per accepted update ({ns.n} records each; load average {load:.2f}"
          f"{' - NOT a quiet machine, times are inflated' if load > 1.0 else ''})")
    print(f"{'update':>24} {'blob bytes':>11} {'written bytes':>14} {'overhead':>9} {'p50 ms':>8} {'p99 ms':>8}")
    with tempfile.TemporaryDirectory(prefix="fedpers-journal-", dir=ns.dir) as tmp:
        journal = Journal(Path(tmp) / "journal")
        for name, (values, codec_name) in SIZES.items():
            blob = make_blob(values, codec_name)
            times, written = [], 0
            for i in range(ns.n):
                t0 = time.perf_counter()
                path = journal.append(JournalRecord(1, i + 1, 100, 100.0, wire.sha256(blob).hex(), time.time(), blob))
                times.append(time.perf_counter() - t0)
                written = path.stat().st_size
            journal.discard(1)
            ms = 1000 * np.array(times)
            print(f"{name:>24} {len(blob):>11,} {written:>14,} {written - len(blob):>9,} "
                  f"{np.percentile(ms, 50):>8.2f} {np.percentile(ms, 99):>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
