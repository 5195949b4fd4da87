"""The Ray engine at scale: rounds per minute and memory with 100, 1,000 and 5,000 virtual devices.

    .venv/bin/python bench/ray_scale.py [--sizes 100:0.5,1000:0.05,5000:0.01] [--rounds 10] [--actors 2]

Each size runs `fedpers-sim --engine ray --devices N --fraction F` as it is (a private local Ray, the
digits CNN, TLS, the server's rate limits on) and reads the run's engine.json: rounds per minute from
the first open round to the federation's end, the whole run's peak memory (the simulator, the server,
Ray's processes and workers: summed PSS, and summed RSS, which counts shared pages once per process),
the server's own peak RSS, and the 1-minute load average before and after (the numbers mean little on
a busy machine). The default fractions select about 50 devices per round at every size, so the rows
differ by the fleet, not by the work per round. Not in `make bench`: the 5,000-device run takes minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIM = [sys.executable, "-m", "fedpers.client.sim"]


def run(devices: int, fraction: float, rounds: int, actors: int, out: Path, timeout: float) -> dict:
    """One `fedpers-sim --engine ray` run; its engine.json and report summary, with timings."""
    argv = SIM + ["--engine", "ray", "--ray-actors", str(actors), "--devices", str(devices), "--fraction",
                  str(fraction), "--rounds", str(rounds), "--report-dir", str(out), "--timeout", str(timeout),
                  "--quiet"]
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    engine = json.loads((out / "engine.json").read_text())
    report = json.loads((out / "report.json").read_text())
    return {"devices": devices, "fraction": fraction, "rounds": len(report["rounds"]),
            "per_round": round(sum(r["devices"] for r in report["rounds"]) / max(1, len(report["rounds"]))),
            "rpm": engine["rounds_per_minute"], "seconds": seconds, "pss": engine["run_peak_pss_bytes"],
            "rss": engine["run_peak_rss_bytes"], "server": engine["server_peak_rss_bytes"],
            "refusals": sum(engine["refusals"].values()), "lost": len(engine["lost"]),
            "load": (load_before, os.getloadavg()[0]), "command": " ".join(["fedpers-sim", *argv[3:]])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/ray_scale.py", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100:0.5,1000:0.05,5000:0.01", help="DEVICES:FRACTION,... (default %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="rounds per run (default 10)")
    p.add_argument("--actors", type=int, default=2, help="Ray actors (default 2)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run (default 3600)")
    args = p.parse_args(argv)
    if importlib.util.find_spec("ray") is None:
        print("ray scale bench skipped: Ray is not installed (pip install 'fedpers[ray]')")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpers-bench-ray-") as tmp:
        for spec in args.sizes.split(","):
            n, f = spec.split(":")
            rows.append(run(int(n), float(f), args.rounds, args.actors, Path(tmp) / f"{n}-{f}", args.timeout))
            print(f"  {rows[-1]['command']}: {rows[-1]['seconds']:.0f}s", flush=True)
    mib = 2**20
    print(f"{'devices':>7} {'fraction':>8} {'per round':>9} {'rounds':>6} {'rounds/min':>10} {'wall s':>7} "
          f"{'run peak PSS MiB':>16} {'run peak RSS MiB':>16} {'server RSS MiB':>14} {'refused':>7} {'lost':>4} "
          f"{'load before/after':>17}")
    for r in rows:
        print(f"{r['devices']:>7} {r['fraction']:>8} {r['per_round']:>9} {r['rounds']:>6} {r['rpm']:>10.1f} "
              f"{r['seconds']:>7.0f} {r['pss'] / mib:>16.0f} {r['rss'] / mib:>16.0f} {r['server'] / mib:>14.0f} "
              f"{r['refusals']:>7} {r['lost']:>4} {r['load'][0]:>8.2f}/{r['load'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
