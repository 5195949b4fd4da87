"""Differential privacy on the demo: accuracy against the epsilon each device spends.

    python bench/dp.py [--noise 0.5,1,2,4] [--clip 1.0] [--rounds 10] [--devices 8]

Runs `make demo`'s simulation (fedpers-sim, digits_cnn_personal.ini, int2+zstd) once without DP
(batch-norm statistics shared, the demo as shipped), once without DP with `--bn-stats local` (the
reference for the DP runs, which need local statistics), and once per noise multiplier with
`--dp-clip CLIP --dp-noise SIGMA`. Epsilon is what a device in every round has spent at delta 1e-5
(dp-accounting RDP, local DP: the server sees each noised update). Accuracy columns are the
simulator's means over devices (weighted by test examples): the final global model with the
device's personal layers, and after the final local personalization.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from fedpers.client.sim import SimConfig, simulate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", default="0.5,1,2,4", help="noise multipliers (default 0.5,1,2,4)")
    ap.add_argument("--clip", type=float, default=1.0, help="L2 clipping norm of a device's delta (default 1.0)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--devices", type=int, default=8)
    ns = ap.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"DP on the demo: {ns.devices} devices, {ns.rounds} rounds, int2+zstd, clip {ns.clip}; "
          f"load average {load:.2f} (accuracy does not depend on it)")
    print(f"{'run':>28} {'epsilon':>8} {'global acc%':>11} {'personalized acc%':>17} {'local-only acc%':>15}")
    runs = [("no DP (bn shared)", dict(bn_stats="shared")), ("no DP (bn local)", dict(bn_stats="local"))]
    runs += [(f"DP noise {s}", dict(bn_stats="local", dp_clip=ns.clip, dp_noise=float(s))) for s in ns.noise.split(",")]
    with tempfile.TemporaryDirectory(prefix="fedpers-dp-") as tmp:
        for i, (name, kw) in enumerate(runs):
            rep = simulate(SimConfig(devices=ns.devices, rounds=ns.rounds, codec="int2+zstd", quiet=True,
                                     report_dir=Path(tmp) / str(i), **kw))
            s = rep.summary
            eps = "-" if s.dp_epsilon is None else f"{s.dp_epsilon:.2f}"

            def pct(v: float | None) -> str:
                return "-" if v is None else f"{100 * v:.1f}"

            print(f"{name:>28} {eps:>8} {pct(s.global_accuracy):>11} {pct(s.personalized_accuracy):>17} "
                  f"{pct(s.local_only_accuracy):>15}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
