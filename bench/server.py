"""Server ingest: N concurrent fake devices upload fp32 deltas of a ~1M-parameter model.

Run with `make bench` or `python bench/server.py [--devices 10,50,200] [--updates 400] [--workers 4]`.
For each N a fresh `fedpers-server` runs in a subprocess on 127.0.0.1 (free port, its own store,
TLS with a throwaway CA, min-devices = N so every round takes all N updates); N device threads in
this process join,
poll GetTask and upload the same precomputed fp32 delta of bench/mlp_1m.ini's shared layers
(1,066,240 floats, ~4.3 MB per update, in 64 KiB chunks). The table shows updates/s over the
upload phase and the server's peak RSS (VmHWM from /proc/<pid>/status). The goal is a peak RSS
flat in N (within 10%): the running-sum aggregator and the bounded gRPC thread pool keep server
memory independent of the number of devices. Every loop is bounded; the run stops by itself.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedpers import codec, wire

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself: the shared fake device
from fakedevice import BenchServer, DeviceStats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

MODEL = Path(__file__).resolve().parent / "mlp_1m.ini"
SHAPES = {"fc1.weight": (784, 1024), "fc1.bias": (1024,), "fc2.weight": (1024, 256), "fc2.bias": (256,)}


def read_kib(pid: int, key: str) -> int:
    """A VmXXX line of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def make_blob(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = []
    for name, shape in SHAPES.items():
        payload, _ = codec.encode("fp32", (1e-3 * rng.standard_normal(shape)).astype(np.float32))
        tensors.append(wire.encoded_to_wire(name, shape, "fp32", payload))
    return wire.tensorset_to_blob(tensors)


@dataclass
class Row:
    devices: int
    rounds: int
    updates: int
    seconds: float
    rss_start_mib: float
    rss_connected_mib: float
    rss_peak_mib: float
    errors: int
    busy: int  # uploads refused as busy (all upload slots in use) and retried


def run_one(n: int, rounds: int, workers: int, blob: bytes, timeout: float) -> Row:
    """One server subprocess, n device threads, `rounds` rounds of n updates each."""
    with tempfile.TemporaryDirectory(prefix="fedpers-bench-server-") as tmp, BenchServer.start(
            Path(tmp), MODEL, "--rounds", str(rounds), "--min-devices", str(n), "--fraction", "1",
            "--round-timeout", str(timeout), "--workers", str(workers), "--retry-after", "0.1") as server:
        rss_start = read_kib(server.proc.pid, "VmRSS")
        results = [DeviceStats() for _ in range(n)]
        deadline = time.monotonic() + timeout
        threads, joined, go = server.start_devices(n, "bench", blob, deadline, results)
        server.wait_joined(joined, timeout)
        rss_connected = read_kib(server.proc.pid, "VmRSS")
        t0 = time.monotonic()
        go.set()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic() + 5))
        rss_peak = read_kib(server.proc.pid, "VmHWM")
    updates = sum(r.uploads for r in results)
    upload_times = [t for r in results for t in r.accepted_at]
    seconds = (max(upload_times) - t0) if upload_times else float("nan")
    errors = sorted((r.error for r in results if r.error), key=lambda e: e == "barrier")  # the cause first
    if errors:
        print(f"  device error (N={n}): {errors[0]}", file=sys.stderr)
    return Row(n, rounds, updates, seconds, rss_start / 1024, rss_connected / 1024, rss_peak / 1024, len(errors),
               sum(r.busy for r in results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="10,50,200", help="comma-separated N values (default 10,50,200)")
    ap.add_argument("--updates", type=int, default=400,
                    help="updates per N: ceil(updates / N) rounds, so every N does the same work (default 400)")
    ap.add_argument("--workers", type=int, default=4, help="server gRPC threads (default 4, the server's)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per N (default 600)")
    ns = ap.parse_args(argv)
    blob = make_blob()
    ns_list = [int(x) for x in ns.devices.split(",") if x.strip()]
    print(f"server ingest: {sum(int(np.prod(s)) for s in SHAPES.values()):,} shared float32 params, "
          f"{len(blob) / 2**20:.2f} MiB per fp32 update, ~{ns.updates} updates per N, {ns.workers} server threads, "
          f"{os.cpu_count()} cpus")
    print(f"{'devices':>8} {'rounds':>7} {'updates':>8} {'seconds':>8} {'updates/s':>10} {'RSS idle MiB':>13} "
          f"{'RSS joined MiB':>15} {'peak RSS MiB':>13} {'vs first':>9} {'errors':>7} {'busy retries':>13}")
    first = None
    for n in ns_list:
        row = run_one(n, max(1, math.ceil(ns.updates / n)), ns.workers, blob, ns.timeout)
        first = first or row.rss_peak_mib
        rate = row.updates / row.seconds if row.seconds > 0 else float("nan")
        growth = row.rss_peak_mib / first - 1
        print(f"{row.devices:>8} {row.rounds:>7} {row.updates:>8} {row.seconds:>8.2f} {rate:>10.1f} "
              f"{row.rss_start_mib:>13.1f} {row.rss_connected_mib:>15.1f} {row.rss_peak_mib:>13.1f} {growth:>+9.1%} "
              f"{row.errors:>7} {row.busy:>13}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
