"""Rounds per minute with one and with two server replicas on PostgreSQL (four real devices, TLS).

    .venv/bin/python bench/replicas.py [--rounds 10] [--repeats 1]

The federation of tests/test_replicas.py (throwaway PostgreSQL, replicas behind docker/fleet_lb.py,
four `fedpers-client run` processes on the digits MLP), without the kill: the time from the devices'
start to the last device's exit, the closed rounds, and the 1-minute load average at the end (the
numbers mean little on a busy machine). Needs the PostgreSQL server binaries (tests/pg_cluster.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.pg_cluster import PgCluster, unavailable  # noqa: E402
from tests.test_replicas import run_federation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/replicas.py", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10, help="rounds per federation (default 10)")
    p.add_argument("--repeats", type=int, default=1, help="federations per replica count (default 1)")
    args = p.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"replicas bench skipped: {reason}")
        return 0
    cluster = PgCluster().start()
    rows = []
    try:
        for n in (1, 2):
            for k in range(args.repeats):
                with tempfile.TemporaryDirectory(prefix="fedpers-bench-rep-") as tmp:
                    url = cluster.create_database(f"bench_{n}_{k}")
                    r = run_federation(Path(tmp), url, replicas=n, rounds=args.rounds)
                    rows.append((n, r["rounds"], r["seconds"], r["rounds/min"], os.getloadavg()[0]))
    finally:
        cluster.stop()
    print(f"{'replicas':>8} {'rounds':>6} {'seconds':>8} {'rounds/min':>10} {'load avg (1 min)':>17}")
    for n, rounds, seconds, rpm, load in rows:
        print(f"{n:>8} {rounds:>6} {seconds:>8.1f} {rpm:>10.1f} {load:>17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
