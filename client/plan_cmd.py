"""`fedpers-client plan`: the memory plan of a model without training: per-tensor table and totals."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpers.nn import ModelError, load_ini
from fedpers.nn.budget import format_size
from fedpers.nn.graph import Compiled
from fedpers.nn.graph import compile as compile_graph
from fedpers.nn.optim import Optimizer

from .train_cmd import MEMORY_MODES


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="show a model's memory plan without training",
                              description="Compile MODEL.ini for a batch size and print where memory goes.")
    p.add_argument("model", type=Path, metavar="MODEL.ini")
    p.add_argument("--batch", type=int, default=None, metavar="B", help="batch size (default: [Model] batch_size)")
    p.add_argument("--memory", choices=MEMORY_MODES, default="planned", help="memory mode to plan (default planned)")
    p.add_argument("--lookahead", type=int, default=2, metavar="K", help="swap lookahead in steps (default 2)")
    p.add_argument("--micro-batch", type=int, default=1, metavar="M", help="micro-batches per batch (default 1)")
    p.add_argument("--png", type=Path, default=None, metavar="FILE",
                   help="draw the arena over execution order (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def plan_rows(c: Compiled) -> list[dict]:
    rows = []
    for i, t in enumerate(c.tensors):
        if t.external:
            continue
        g = c.groups[t.group]
        rows.append({
            "name": t.name, "role": t.role, "shape": list(t.shape), "bytes": t.nbytes,
            "touches": sorted(t.touches),
            "segments": [{"first": s.first, "last": s.last, "offset": s.offset} for s in g.segments],
            "shares_with": [c.tensors[m].name for m in g.members if m != i],
        })
    return rows


def totals(c: Compiled) -> dict:
    swapped = sum(g.nbytes for g in c.groups if g.swapped)
    return {
        "mode": c.mode, "batch": c.batch, "micro_batch": c.micro_batch, "lookahead": c.lookahead,
        "steps": c.steps, "naive_bytes": c.naive_bytes, "arena_bytes": c.plan.total,
        "lower_bound_bytes": c.lower_bound_bytes, "weights_bytes": c.bytes_of("weight") + c.bytes_of("stat"),
        "gradient_bytes": c.bytes_of("grad"), "optimizer_bytes": c.bytes_of("opt"),
        "swap_bytes_per_iteration": swapped,
    }


def draw(c: Compiled, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    colors = {"weight": "#4c72b0", "stat": "#4c72b0", "grad": "#dd8452", "gradacc": "#dd8452", "opt": "#8172b3",
              "act": "#55a868", "deriv": "#c44e52", "scratch": "#937860"}
    fig, ax = plt.subplots(figsize=(12, 6))
    mib = 1024 * 1024
    for g in c.groups:
        role = c.tensors[g.members[0]].role
        for s in g.segments:
            ax.add_patch(Rectangle((s.first, s.offset / mib), s.last - s.first + 1, g.nbytes / mib,
                                   facecolor=colors.get(role, "grey"), edgecolor="black", linewidth=0.3, alpha=0.8))
    ax.set_xlim(0, c.steps)
    ax.set_ylim(0, max(c.plan.total / mib, 1e-3) * 1.02)
    ax.axhline(c.lower_bound_bytes / mib, color="black", linestyle="--", linewidth=0.8, label="lower bound")
    ax.set_xlabel("execution order (forward, then calc-grad / calc-deriv / apply-grad per layer)")
    ax.set_ylabel("arena offset (MiB)")
    ax.set_title(f"{c.mode} arena: {format_size(c.plan.total)} (naive {format_size(c.naive_bytes)}), batch {c.batch}")
    handles = [Rectangle((0, 0), 1, 1, facecolor=v) for v in ("#4c72b0", "#dd8452", "#8172b3", "#55a868", "#c44e52",
                                                              "#937860")]
    ax.legend(handles + [ax.lines[0]], ["weights", "gradients", "optimizer", "activations", "derivatives", "scratch",
                                        "lower bound"], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    try:
        spec = load_ini(args.model)
        batch = args.batch or spec.batch_size
        slots = Optimizer(spec.optimizer).slots
        c = compile_graph(spec, batch, mode=args.memory, lookahead=args.lookahead, micro_batch=args.micro_batch,
                          optimizer_slots=slots, allocate=False)
    except (ModelError, ValueError, FileNotFoundError) as e:
        print(f"fedpers-client plan: {e}", file=sys.stderr)
        return 2
    rows, tot = plan_rows(c), totals(c)
    if args.png:
        try:
            draw(c, args.png)
        except ImportError:
            print("fedpers-client plan: --png needs matplotlib (pip install 'fedpers[plot]')", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({"tensors": rows, "totals": tot}))
        return 0
    print(f"{'tensor':<34} {'role':<8} {'bytes':>11} {'lifespan':>11}  offset(s)")
    for r in rows:
        span = f"{min(r['touches'])}-{max(r['touches'])}" if r["touches"] else "-"
        offs = " | ".join(f"{s['offset']}@{s['first']}-{s['last']}" for s in r["segments"])
        print(f"{r['name'][:34]:<34} {r['role']:<8} {r['bytes']:>11,} {span:>11}  {offs}")
    print()
    for k, v in tot.items():
        print(f"{k:<26} {format_size(v) + f' ({v:,})' if k.endswith('bytes') or k.endswith('iteration') else v}")
    return 0
