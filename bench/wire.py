"""Bytes on the wire per codec: the demo federation once per codec, upload size against accuracy.

Each codec runs the same simulation (`fedpers-sim`: same partition, seeds and rounds) and the
table gives the bytes a device sends per round, how many times fewer than fp32 that is, and the
final accuracies on the devices' held-out splits.
Run: .venv/bin/python bench/wire.py [--devices 8] [--rounds 10] [--codecs fp32,int8,...] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from fedpers.client import sim  # noqa: E402

DEFAULT_CODECS = "fp32,fp16,int8,int4,int2,int2+zstd,topk:0.05,topk:0.01+zstd"


def full_model_bytes(model: str | None) -> int:
    """Bytes of every weight of the model as one fp32 TensorSet blob (what a device without personal
    layers or compression would upload each round)."""
    from fedpers import wire
    from fedpers.nn import init_weights, load_ini

    spec = load_ini(model or sim.DEFAULT_MODEL)
    return len(wire.arrays_to_blob(init_weights(spec, 0)))


def run_one(codec: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    report_dir = out / f"{codec.replace(':', '_').replace('+', '-')}-seed{seed}"
    given = {"model": Path(args.model)} if args.model else {}
    if args.local_epochs:
        given["local_epochs"] = args.local_epochs
    cfg = sim.SimConfig(devices=args.devices, rounds=args.rounds, codec=codec, seed=seed, report_dir=report_dir,
                        quiet=True, **given)
    t0 = time.monotonic()
    report = sim.simulate(cfg).to_dict()
    report["bench_seconds"] = time.monotonic() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--codecs", default=DEFAULT_CODECS, help=f"comma-separated (default {DEFAULT_CODECS})")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; numbers are means over seeds")
    p.add_argument("--model", default=None, help="model INI (default: the simulator's)")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-wire"), help="where the runs' reports go")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = p.parse_args(argv)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    rows = []
    for c in codecs:
        reps = [run_one(c, s, args, out) for s in seeds]
        summ = [r["summary"] for r in reps]
        rows.append({
            "codec": c,
            "bytes_up_per_device_round": statistics.mean(s["bytes_up_per_device_round"] for s in summ),
            "global_accuracy": statistics.mean(s["global_accuracy"] for s in summ),
            "personalized_accuracy": statistics.mean(s["personalized_accuracy"] for s in summ),
            "local_only_accuracy": statistics.mean(s["local_only_accuracy"] for s in summ),
            "seconds": statistics.mean(r["bench_seconds"] for r in reps),
        })
        print(f"  {c}: done ({rows[-1]['seconds']:.0f}s per run)", file=sys.stderr, flush=True)
    ref = next((r for r in rows if r["codec"] == "fp32"), rows[0])
    full = full_model_bytes(args.model)
    head = (f"{'codec':<16} {'bytes up/dev/round':>18} {'x vs fp32 delta':>15} {'x vs fp32 full':>14} "
            f"{'global %':>8} {'personal %':>10} {'d global':>8} {'d personal':>10} {'local-only %':>12}")
    print(f"wire benchmark: {args.devices} devices, {args.rounds} rounds, seeds {seeds}. 'fp32 delta': the shared "
          f"tensors' delta as fp32 ({ref['bytes_up_per_device_round']:,.0f} B, the fp32 row); 'fp32 full': every "
          f"weight of the model as fp32, as plain FedAvg without personal layers would send ({full:,} B). "
          f"Accuracies: held-out means weighted by test examples; 'd' in points against {ref['codec']}.")
    print(head)
    print("-" * len(head))
    for r in rows:
        r["x_fewer_than_fp32_delta"] = ref["bytes_up_per_device_round"] / r["bytes_up_per_device_round"]
        r["x_fewer_than_fp32_full"] = full / r["bytes_up_per_device_round"]
        r["personalized_delta_points"] = 100 * (r["personalized_accuracy"] - ref["personalized_accuracy"])
        r["global_delta_points"] = 100 * (r["global_accuracy"] - ref["global_accuracy"])
        print(f"{r['codec']:<16} {r['bytes_up_per_device_round']:>18,.0f} {r['x_fewer_than_fp32_delta']:>15.1f} "
              f"{r['x_fewer_than_fp32_full']:>14.1f} {100 * r['global_accuracy']:>8.1f} "
              f"{100 * r['personalized_accuracy']:>10.1f} {r['global_delta_points']:>+8.1f} "
              f"{r['personalized_delta_points']:>+10.1f} {100 * r['local_only_accuracy']:>12.1f}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
