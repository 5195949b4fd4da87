"""Load: hundreds of devices with real gRPC channels and real ~4.3 MB uploads through 5 rounds.

    python bench/load.py                          # both tables below
    python bench/load.py --only 200               # or --only 1000

1. 200 devices x 5 rounds: every device is selected in every round (the round closes when all 200
   have reported).
2. 1,000 devices x 5 rounds with over-selection: --target-devices 100 --over-select 0.3, so 130
   are selected per round, the round closes at 100 updates and the other 30 are late (refused,
   counted).

The server is a real `fedpers-server` subprocess (bench/mlp_1m.ini with `output` personal: fc1 + fc2,
1,066,240 float32 values per update, journaled before each acknowledgement) on 127.0.0.1. Each
device is a thread of this process with its own FederationClient (its own channel and TCP
connection) that joins, polls GetTask and uploads a precomputed fp32 delta; a busy server
(UNAVAILABLE: all upload slots taken) is retried with the agent's capped, jittered backoff.
Columns: errors (devices that failed), rounds closed, late updates, server peak RSS (VmHWM),
p50/p99 upload latency (first attempt to acknowledgement, busy retries included), rounds per
minute (first round opened to last closed). The load average is printed: numbers only mean
something on a quiet machine. Every loop is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from fakedevice import BenchServer, DeviceStats  # noqa: E402

from server import MODEL, make_blob, read_kib  # noqa: E402  (bench/server.py: the same model and blob)


@dataclass(frozen=True)
class Scenario:
    name: str
    devices: int
    server_flags: tuple[str, ...]
    retry_after: float


SCENARIOS = {
    "200": Scenario("200 devices, all selected", 200, ("--min-devices", "200"), 1.0),
    "1000": Scenario("1000 devices, over-selection 100 (+30%)", 1000,
                     ("--min-devices", "100", "--target-devices", "100", "--over-select", "0.3"), 2.0),
}


@dataclass
class Row:
    scenario: Scenario
    errors: int
    rounds: int
    uploads: int
    late: int
    busy: int
    rss_peak_mib: float
    p50: float
    p99: float
    rounds_per_min: float


def run(sc: Scenario, rounds: int, workers: int, timeout: float, blob: bytes) -> Row:
    from fedpers.stub import get_status

    stats = [DeviceStats() for _ in range(sc.devices)]
    with tempfile.TemporaryDirectory(prefix="fedpers-bench-load-") as tmp, BenchServer.start(
            Path(tmp), MODEL, "--rounds", str(rounds), "--round-timeout", str(timeout), "--workers", str(workers),
            "--max-devices", str(sc.devices), "--retry-after", str(sc.retry_after), *sc.server_flags) as server:
        deadline = time.monotonic() + timeout
        threads, joined, go = server.start_devices(sc.devices, "load", blob, deadline, stats, backoff_max=2.0)
        server.wait_joined(joined, timeout)
        t_go = time.monotonic()
        go.set()
        first_open = last_close = None
        status = None
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            try:
                status = get_status(server.address, tls=server.tls, admin_token=server.admin_token, timeout=10)
            except grpc.RpcError:
                time.sleep(0.5)
                continue
            if first_open is None and status.current_round:
                first_open = time.monotonic()
            if status.rounds_completed >= rounds and last_close is None:
                last_close = time.monotonic()
            time.sleep(0.25)
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic() + 5))
        status = get_status(server.address, tls=server.tls, admin_token=server.admin_token, timeout=10)
        rss_peak = read_kib(server.proc.pid, "VmHWM") / 1024
    lat = np.array([x for s in stats for x in s.latencies] or [float("nan")])
    errors = sorted((s.error for s in stats if s.error), key=lambda e: e == "barrier")  # the cause first
    if errors:
        print(f"  {len(errors)} device errors, e.g. {errors[0]}", file=sys.stderr)
    span = ((last_close or time.monotonic()) - (first_open or t_go)) / 60
    return Row(sc, len(errors), status.rounds_completed, sum(s.uploads for s in stats),
               status.late_updates, sum(s.busy for s in stats), rss_peak,
               float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
               status.rounds_completed / span if span > 0 else float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=tuple(SCENARIOS), help="run one scenario (default both)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per scenario (default 5)")
    ap.add_argument("--workers", type=int, default=4, help="server gRPC threads (default 4, the server's)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per scenario (default 900)")
    ns = ap.parse_args(argv)
    blob = make_blob()
    load = os.getloadavg()[0]
    print(f"load: {len(blob) / 2**20:.2f} MiB fp32 uploads (1,066,240 params), {ns.rounds} rounds, {ns.workers} "
          f"server threads, {os.cpu_count()} cpus; load average {load:.2f}"
          f"{' - NOT a quiet machine: latencies and rates are pessimistic' if load > 1.0 else ''}")
    print(f"{'scenario':>40} {'errors':>6} {'rounds':>6} {'uploads':>7} {'late':>5} {'busy':>6} "
          f"{'peak RSS MiB':>12} {'p50 s':>6} {'p99 s':>6} {'rounds/min':>10}")
    for key in ([ns.only] if ns.only else list(SCENARIOS)):
        r = run(SCENARIOS[key], ns.rounds, ns.workers, ns.timeout, blob)
        print(f"{r.scenario.name:>40} {r.errors:>6} {r.rounds:>6} {r.uploads:>7} {r.late:>5} {r.busy:>6} "
              f"{r.rss_peak_mib:>12.1f} {r.p50:>6.2f} {r.p99:>6.2f} {r.rounds_per_min:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
