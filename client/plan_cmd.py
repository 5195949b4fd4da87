"""`fedpers-client plan`: the memory plan of a model without training: per-tensor table and totals."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpers.argtypes import positive_int
from fedpers.nn import ModelError, load_ini
from fedpers.nn.budget import format_size
from fedpers.nn.graph import Compiled
from fedpers.nn.graph import compile as compile_graph
from fedpers.nn.modes import (
    DEFAULT_KERNELS,
    DEFAULT_MEMORY_MODE,
    KERNEL_BACKENDS,
    MEMORY_MODES,
    kernel_backends_help,
    memory_modes_help,
)
from fedpers.nn.optim import Optimizer


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="show a model's memory plan without training",
                              description="Compile MODEL.ini for a batch size and print where memory goes.")
    p.add_argument("model", type=Path, metavar="MODEL.ini")
    p.add_argument("--batch", type=positive_int, default=None, metavar="B",
                   help="batch size (default: [Model] batch_size)")
    p.add_argument("--memory", choices=MEMORY_MODES, default=DEFAULT_MEMORY_MODE,
                   help="memory mode to plan: " + memory_modes_help(DEFAULT_MEMORY_MODE))
    p.add_argument("--lookahead", type=positive_int, default=2, metavar="K", help="swap lookahead in steps (default 2)")
    p.add_argument("--micro-batch", type=positive_int, default=1, metavar="M",
                   help="micro-batches per batch (default 1)")
    p.add_argument("--kernels", choices=KERNEL_BACKENDS, default=DEFAULT_KERNELS,
                   help="kernel backend whose scratch to plan: " + kernel_backends_help(DEFAULT_KERNELS))
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


KINDS = (  # legend label, roles, color
    ("weights", ("weight", "stat"), "#4c72b0"),
    ("gradients", ("grad", "gradacc"), "#dd8452"),
    ("optimizer", ("opt",), "#8172b3"),
    ("activations", ("act",), "#55a868"),
    ("derivatives", ("deriv",), "#c44e52"),
    ("scratch", ("scratch",), "#937860"),
)
LABEL_SHARE = 0.04  # name a buffer in the drawing when it holds at least this share of the arena


def _swap_rows(spans: list[tuple[int, int, int]]) -> list[int]:
    """Stack swapped-out spans (first, last, bytes) without overlap, largest first: each span's y offset."""
    placed: list[tuple[int, int, int, int]] = []  # (first, last, bytes, y)
    ys = [0] * len(spans)
    for i in sorted(range(len(spans)), key=lambda k: (-spans[k][2], spans[k][0])):
        first, last, nbytes = spans[i]
        y = 0
        for _, _, b, oy in sorted((p for p in placed if not (p[1] < first or last < p[0])), key=lambda p: p[3]):
            if y + nbytes <= oy:
                break
            y = max(y, oy + b)
        placed.append((first, last, nbytes, y))
        ys[i] = y
    return ys


def draw(c: Compiled, path: Path) -> None:
    """The arena over execution order: each buffer a box (named when big), the forward/backward boundary,
    the lower bound, and (swap mode) what sits in the swap file between its two lives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    color = {role: col for _, roles, col in KINDS for role in roles}
    swapped = [g for g in c.groups if g.swapped]
    fig, axes = plt.subplots(2 if swapped else 1, 1, figsize=(12, 7.5 if swapped else 6), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]} if swapped else None)
    ax = axes[0][0]
    mib = 1024 * 1024
    present: set[str] = set()
    for g in c.groups:
        if not g.nbytes:
            continue
        first = c.tensors[g.members[0]]
        present.add(first.role)
        for s in g.segments:
            ax.add_patch(Rectangle((s.first, s.offset / mib), s.last - s.first + 1, g.nbytes / mib,
                                   facecolor=color.get(first.role, "grey"), edgecolor="black", linewidth=0.3,
                                   alpha=0.8))
            if g.nbytes >= LABEL_SHARE * c.plan.total and s.last - s.first >= 2:
                ax.text(s.first + (s.last - s.first + 1) / 2, (s.offset + g.nbytes / 2) / mib, first.name,
                        ha="center", va="center", fontsize=7, clip_on=True)
    forward_end = len(c.nodes) - 0.5
    ax.axvline(forward_end, color="black", linewidth=1.0, label="forward | backward")
    ax.axhline(c.lower_bound_bytes / mib, color="black", linestyle="--", linewidth=0.8, label="lower bound")
    ax.set_xlim(0, c.steps)
    ax.set_ylim(0, max(c.plan.total / mib, 1e-3) * 1.02)
    ax.set_ylabel("arena offset (MiB)")
    ax.set_title(f"{c.mode} arena: {format_size(c.plan.total)} (naive {format_size(c.naive_bytes)}), batch {c.batch}")
    handles = [Rectangle((0, 0), 1, 1, facecolor=col) for _, roles, col in KINDS if present & set(roles)]
    labels = [label for label, roles, _ in KINDS if present & set(roles)]
    lines = ax.get_lines()
    ax.legend(handles + lines, labels + [ln.get_label() for ln in lines], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8)
    bottom = ax
    if swapped:
        sx = axes[1][0]
        spans = [(g.segments[0].last + 1, g.segments[1].first - 1, g.nbytes) for g in swapped]
        ys = _swap_rows(spans)
        for (first, last, nbytes), y, g in zip(spans, ys, swapped, strict=True):
            sx.add_patch(Rectangle((first, y / mib), last - first + 1, nbytes / mib, facecolor="none",
                                   edgecolor=color.get(c.tensors[g.members[0]].role, "grey"), hatch="///",
                                   linewidth=0.6))
        top = max((y + s[2] for s, y in zip(spans, ys, strict=True)), default=1)
        sx.set_ylim(0, top / mib * 1.05)
        sx.axvline(forward_end, color="black", linewidth=1.0)
        sx.set_ylabel("in swap file (MiB)")
        sx.set_title("swapped out: written after the last forward use, read back before the first backward use",
                     fontsize=9)
        bottom = sx
    bottom.set_xlabel("execution order (forward, then calc-grad / calc-deriv / apply-grad per layer)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    try:
        spec = load_ini(args.model)
        batch = args.batch or spec.batch_size
        slots = Optimizer(spec.optimizer).slots
        c = compile_graph(spec, batch, mode=args.memory, lookahead=args.lookahead, micro_batch=args.micro_batch,
                          optimizer_slots=slots, allocate=False, kernels=args.kernels)
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
        print(json.dumps({"tensors": rows, "totals": tot, "notes": list(spec.notes)}))
        return 0
    print(f"{'tensor':<34} {'role':<8} {'bytes':>11} {'lifespan':>11}  offset(s)")
    for r in rows:
        span = f"{min(r['touches'])}-{max(r['touches'])}" if r["touches"] else "-"
        offs = " | ".join(f"{s['offset']}@{s['first']}-{s['last']}" for s in r["segments"])
        print(f"{r['name'][:34]:<34} {r['role']:<8} {r['bytes']:>11,} {span:>11}  {offs}")
    print()
    for k, v in tot.items():
        print(f"{k:<26} {format_size(v) + f' ({v:,})' if k.endswith('bytes') or k.endswith('iteration') else v}")
    if spec.notes:  # NNTrainer keys the model file gives that fedpers accepts without acting on them
        print()
        for note in spec.notes:
            print(f"note: {note}")
    return 0
