"""Which of NNTrainer's own model files fedpers loads and plans, and why not.

Takes an NNTrainer checkout (a git repository, bare or not: its .ini files under Applications/ and
test/test_models/ are extracted with `git archive` into a temp dir) or a plain directory of .ini
files, and prints one row per file: whether it uses only layers fedpers has (loss layers count,
so cross with a sigmoid output -- NNTrainer's cross_sigmoid -- does not), whether `load_ini` reads
it, whether `graph.compile` plans it (arena bytes at the file's batch size), and why not / notes.
Exit status 1 when a file that uses only fedpers's layers fails to load or plan.

Run: .venv/bin/python bench/nntrainer_compat.py /path/to/nntrainer [--notes] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from fedpers.nn import ModelError, load_ini
from fedpers.nn.budget import format_size
from fedpers.nn.graph import compile as compile_graph
from fedpers.nn.ini import FIXED_SECTIONS, LOSS_LAYERS, _split_sections
from fedpers.nn.layers import KINDS
from fedpers.nn.optim import Optimizer

PLACES = ("Applications/", "test/test_models/")


@dataclass
class Row:
    file: str
    ours: bool
    missing: str  # what fedpers lacks ("" when ours)
    loads: bool
    plans: bool
    arena_bytes: int | None
    why: str  # the error, when it does not load or plan
    notes: list[str]


def _is_git(path: Path) -> bool:
    r = subprocess.run(["git", "-C", str(path), "rev-parse", "--git-dir"], capture_output=True, text=True)
    return r.returncode == 0


def extract(repo: Path, into: Path) -> list[Path]:
    """The repository's model .ini files, written under `into` with their repository paths."""
    names = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", "HEAD"], check=True,
                           capture_output=True, text=True).stdout.split()
    wanted = [n for n in names if n.endswith(".ini") and n.startswith(PLACES)]
    if not wanted:
        return []
    tar = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", "HEAD", *wanted], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    return [into / n for n in wanted]


def layer_types(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """Layer types a file uses (through .ini backbones); other backbones show as 'backbone:NAME'."""
    out = []
    for s in _split_sections(path.read_text(encoding="utf-8", errors="replace"), str(path)):
        if s.name in FIXED_SECTIONS.values():
            continue
        if "backbone" in s.entries:
            target = s.entries["backbone"].value.strip()
            inner = (path.parent / target).resolve()
            if target.lower().endswith(".ini") and inner.is_file() and inner not in seen:
                out += layer_types(inner, (*seen, inner))
            else:
                out.append(f"backbone:{target}")
        elif "type" in s.entries:
            out.append(s.entries["type"].value.strip().lower())
        else:
            out.append("(no type)")
    return out


def check(path: Path, root: Path) -> Row:
    rel = str(path.relative_to(root))
    try:
        types = layer_types(path)
    except (ModelError, OSError) as e:
        return Row(rel, False, f"unreadable ({e})", False, False, None, str(e), [])
    missing = sorted({t for t in types if t not in KINDS and t not in LOSS_LAYERS})
    row = Row(rel, not missing, ", ".join(missing), False, False, None, "", [])
    try:
        spec = load_ini(path)
    except ModelError as e:
        row.why = str(e).replace(str(path) + ":", "line ")
        return row
    row.loads, row.notes = True, list(spec.notes)
    last = next((ls for ls in reversed(spec.layers) if ls.type != "dropout"), spec.layers[-1])
    if spec.loss == "cross" and last.activation == "sigmoid":
        row.ours, row.missing = False, ", ".join(filter(None, [row.missing, "cross_sigmoid loss"]))
    try:
        c = compile_graph(spec, spec.batch_size, optimizer_slots=Optimizer(spec.optimizer).slots, allocate=False)
    except (ModelError, ValueError) as e:
        row.why = str(e)
        return row
    row.plans, row.arena_bytes = True, c.plan.total
    return row


def table(rows: list[Row], show_notes: bool) -> str:
    lines = ["| file | our layers only? | loads | plans | notes |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ours = "yes" if r.ours else f"no ({r.missing})"
        plans = f"yes ({format_size(r.arena_bytes)} arena, batch from the file)" if r.plans else "no"
        why = r.why.split("; known:")[0] or (f"{len(r.notes)} note(s)" if r.notes else "")
        if show_notes and r.notes:
            why += ": " + "; ".join(r.notes)
        lines.append(f"| {r.file} | {ours} | {'yes' if r.loads else 'no'} | {plans} | {why} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nntrainer", type=Path, help="NNTrainer git repository (bare or checkout) or a folder of .ini")
    ap.add_argument("--notes", action="store_true", help="show every note, not only their count")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nntrainer-ini-") as tmp:
        if _is_git(args.nntrainer):
            root = Path(tmp)
            files = extract(args.nntrainer, root)
        else:
            root = args.nntrainer
            files = sorted(p for p in root.rglob("*.ini") if str(p.relative_to(root)).startswith(PLACES))
        rows = [check(p, root) for p in sorted(files)]
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(table(rows, args.notes))
        ours = [r for r in rows if r.ours]
        ok = [r for r in ours if r.loads and r.plans]
        print(f"\n{len(rows)} files; {len(ours)} use only fedpers's layers, of which {len(ok)} load and plan; "
              f"{sum(r.loads for r in rows)} load in all")
    return 0 if all(r.loads and r.plans for r in rows if r.ours) else 1


if __name__ == "__main__":
    sys.exit(main())
