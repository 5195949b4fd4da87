"""Bytes on the wire per codec: the demo federation once per codec, bytes against accuracy, both directions.

Up: each upload codec runs the same simulation (`fedpers-sim`: same partition, seeds and rounds); the
table gives the bytes a device sends per round, how many times fewer than fp32 that is, and the final
accuracies on the devices' held-out splits.
Down: with the upload codec fixed (--uplink), each downlink codec publishes every version as the
previous one plus a compressed step, so devices download only the steps since the version they hold;
the table gives the bytes a device receives against whole fp32 models ('none'), and the accuracies.
Run: .venv/bin/python bench/wire.py [--devices 8] [--rounds 10] [--codecs fp32,int8,...] [--seeds 0,1]
     [--downlinks none,int8+zstd,int4+zstd] [--uplink int2+zstd] [--only up|down]
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
DEFAULT_DOWNLINKS = "none,int8+zstd,int4+zstd,int2+zstd"


def full_model_bytes(model: str | None) -> int:
    """Bytes of every weight of the model as one fp32 TensorSet blob (what a device without personal
    layers or compression would upload each round)."""
    from fedpers import wire
    from fedpers.nn import init_weights, load_ini

    spec = load_ini(model or sim.DEFAULT_MODEL)
    return len(wire.arrays_to_blob(init_weights(spec, 0)))


def run_one(codec: str, seed: int, args: argparse.Namespace, out: Path, downlink: str = "none") -> dict:
    tag = f"{codec}-down-{downlink}" if downlink != "none" else codec
    report_dir = out / f"{tag.replace(':', '_').replace('+', '-')}-seed{seed}"
    given = {"model": Path(args.model)} if args.model else {}
    if args.local_epochs:
        given["local_epochs"] = args.local_epochs
    cfg = sim.SimConfig(devices=args.devices, rounds=args.rounds, codec=codec, seed=seed, report_dir=report_dir,
                        quiet=True, downlink_codec=downlink, **given)
    t0 = time.monotonic()
    report = sim.simulate(cfg).to_dict()
    report["bench_seconds"] = time.monotonic() - t0
    return report


def mean_of(reps: list[dict], key: str) -> float:
    return statistics.mean(r["summary"][key] for r in reps)


def uplink_table(args: argparse.Namespace, seeds: list[int], out: Path) -> list[dict]:
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    rows = []
    for c in codecs:
        reps = [run_one(c, s, args, out) for s in seeds]
        rows.append({
            "codec": c,
            "bytes_up_per_device_round": mean_of(reps, "bytes_up_per_device_round"),
            "global_accuracy": mean_of(reps, "global_accuracy"),
            "personalized_accuracy": mean_of(reps, "personalized_accuracy"),
            "local_only_accuracy": mean_of(reps, "local_only_accuracy"),
            "seconds": statistics.mean(r["bench_seconds"] for r in reps),
        })
        print(f"  {c}: done ({rows[-1]['seconds']:.0f}s per run)", file=sys.stderr, flush=True)
    ref = next((r for r in rows if r["codec"] == "fp32"), rows[0])
    full = full_model_bytes(args.model)
    head = (f"{'codec':<16} {'bytes up/dev/round':>18} {'x vs fp32 delta':>15} {'x vs fp32 full':>14} "
            f"{'global %':>8} {'personal %':>10} {'d global':>8} {'d personal':>10} {'local-only %':>12}")
    print(f"uplink: {args.devices} devices, {args.rounds} rounds, seeds {seeds}. 'fp32 delta': the shared "
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
    return rows


def downlink_table(args: argparse.Namespace, seeds: list[int], out: Path) -> list[dict]:
    codecs = [c.strip() for c in args.downlinks.split(",") if c.strip()]
    if "none" not in codecs:
        codecs.insert(0, "none")  # the reference: every download a whole fp32 model
    rows = []
    for c in codecs:
        reps = [run_one(args.uplink, s, args, out, downlink=c) for s in seeds]
        rows.append({
            "downlink": c,
            "bytes_down_per_device": statistics.mean(r["summary"]["bytes_down"] / len(r["devices"]) for r in reps),
            "global_accuracy": mean_of(reps, "global_accuracy"),
            "personalized_accuracy": mean_of(reps, "personalized_accuracy"),
            "seconds": statistics.mean(r["bench_seconds"] for r in reps),
        })
        print(f"  down {c}: done ({rows[-1]['seconds']:.0f}s per run)", file=sys.stderr, flush=True)
    ref = rows[0]
    downloads = args.rounds + 1  # the first model, one per round after it, and the final model
    whole = ref["bytes_down_per_device"] / downloads
    head = (f"{'downlink':<12} {'bytes down/dev':>14} {'x vs fp32 models':>16} {'x per step':>10} {'global %':>8} "
            f"{'personal %':>10} {'d global':>8} {'d personal':>10}")
    print(f"downlink: {args.devices} devices, {args.rounds} rounds, uploads {args.uplink}, seeds {seeds}. 'bytes "
          f"down/dev': all a device downloaded (the first model whole, then the compressed steps since the version "
          f"it held, checked bit for bit); 'none': every download a whole fp32 model "
          f"({ref['bytes_down_per_device']:,.0f} B); 'x per step': a whole model ({whole:,.0f} B) against one "
          f"step, once a device holds a model. 'd' in points against none.")
    print(head)
    print("-" * len(head))
    for r in rows:
        r["x_fewer_than_fp32_models"] = ref["bytes_down_per_device"] / r["bytes_down_per_device"]
        step = (r["bytes_down_per_device"] - whole) / (downloads - 1)
        r["x_per_step"] = whole / step if step > 0 else 1.0
        r["global_delta_points"] = 100 * (r["global_accuracy"] - ref["global_accuracy"])
        r["personalized_delta_points"] = 100 * (r["personalized_accuracy"] - ref["personalized_accuracy"])
        print(f"{r['downlink']:<12} {r['bytes_down_per_device']:>14,.0f} {r['x_fewer_than_fp32_models']:>16.1f} "
              f"{r['x_per_step']:>10.1f} {100 * r['global_accuracy']:>8.1f} {100 * r['personalized_accuracy']:>10.1f} "
              f"{r['global_delta_points']:>+8.1f} {r['personalized_delta_points']:>+10.1f}")
    return rows


def step_sizes(downlinks: list[str]) -> None:
    """One step of the ~1M-parameter model of bench/server.py (a Gaussian step: harder to compress than a
    trained one) per downlink codec, against the whole fp32 model: where per-tensor framing no longer counts."""
    import numpy as np
    from fedpers import codec as codecs
    from fedpers import wire
    from fedpers.nn import init_weights, load_ini
    from fedpers.server.downlink import Downlink

    weights = init_weights(load_ini(ROOT / "bench" / "mlp_1m.ini"), 0)
    whole = len(wire.arrays_to_blob(weights))
    rng = np.random.default_rng(0)
    target = {k: w + (1e-3 * rng.standard_normal(w.shape)).astype(np.float32) for k, w in weights.items()}
    print(f"\none step of a {sum(w.size for w in weights.values()):,}-parameter model (bench/mlp_1m.ini), whole "
          f"fp32 model {whole:,} B:")
    for name in (d for d in downlinks if d != "none"):
        dl = Downlink(codecs.parse_codec(name))
        _, extra = dl.publish(1, weights, target)
        size = len(wire.model_steps_to_blob(wire.ModelSteps(0, 1, (tuple(wire.tensorset_from_blob(
            extra["downlink/step"].tobytes())),), b"\0" * 32)))
        print(f"  {name:<12} {size:>12,} B  {whole / size:5.1f}x fewer")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--codecs", default=DEFAULT_CODECS,
                   help=f"upload codecs, comma-separated (default {DEFAULT_CODECS})")
    p.add_argument("--downlinks", default=DEFAULT_DOWNLINKS,
                   help=f"downlink codecs, comma-separated (default {DEFAULT_DOWNLINKS})")
    p.add_argument("--uplink", default="int2+zstd", help="the upload codec of the downlink table (default int2+zstd)")
    p.add_argument("--only", choices=("up", "down"), default=None, help="one table (default both)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; numbers are means over seeds")
    p.add_argument("--model", default=None, help="model INI (default: the simulator's)")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-wire"), help="where the runs' reports go")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    rows: dict[str, list[dict]] = {}
    if args.only in (None, "up"):
        rows["uplink"] = uplink_table(args, seeds, out)
    if args.only in (None, "down"):
        if rows:
            print()
        rows["downlink"] = downlink_table(args, seeds, out)
        step_sizes([c.strip() for c in args.downlinks.split(",") if c.strip()])
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
