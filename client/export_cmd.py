"""`fedpers-client export`: the device's personalized model -- the server's base it last trained
against plus its own personal tensors, both kept in --state, or, after a federation with a
personalization method, the model its per-device choice serves -- as .npz or in NNTrainer's layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from fedpers.export import FORMATS, ExportError, complete, print_written, write_model
from fedpers.nn import ModelError, ModelSpec, WeightError, load_ini
from fedpers.store import StoreError

from .agent import MODEL_FILE
from .personal import STATE_FILE, PersonalStore, StateError, overlay


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write the device's personalized model (.npz, or NNTrainer's .bin + .ini)",
        description="Write the device's personalized model: the base it last trained against and its personal "
                    "layers, from --state (its model file is DIR/model.ini). NNTrainer's format writes PATH.bin "
                    "and PATH.ini, which NNTrainer loads as they are.")
    p.add_argument("--state", required=True, type=Path, metavar="DIR", help="the device's --state directory")
    p.add_argument("--out", required=True, type=Path, metavar="PATH", help="where to write (.npz or .bin)")
    p.add_argument("--format", choices=sorted(FORMATS), default=None,
                   help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()) + " (default: from PATH's suffix)")
    p.add_argument("--json", action="store_true", help="print one JSON object: paths, base version, notes")
    return p


def personalized_model(state_dir: Path) -> tuple[ModelSpec, dict[str, np.ndarray], list[str]]:
    """(model, every weight, notes) of the device in `state_dir`: its kept base overlaid with its local
    tensors; anything in neither takes the model's initial value (and is named in the notes)."""
    if not state_dir.is_dir():
        raise StateError(f"{state_dir}: no such state directory")
    model = state_dir / MODEL_FILE
    if not model.is_file():
        raise StateError(f"{model}: missing; a device writes its model file when it receives its first task")
    if not (state_dir / STATE_FILE).is_file():
        raise StateError(f"{state_dir / STATE_FILE}: missing; is {state_dir} a device's --state?")
    spec = load_ini(model)
    state = PersonalStore(state_dir).load()
    if state is None or not state.base:
        raise StateError(f"{state_dir}: the device keeps no base model yet (it keeps one from its first completed "
                         "round on)")
    if state.served:  # a personalization method's per-device choice: the whole model it serves
        weights, filled = complete(spec, state.served)
        notes = [f"the {state.served_name} model device {state.name} serves (its per-device choice after version "
                 f"{state.base_kept})"]
        return spec, weights, notes + ([f"initial values: {', '.join(filled)}"] if filled else [])
    initial, _ = complete(spec, {})
    weights = overlay(initial, state.base, state.local)
    _, filled = complete(spec, {k: v for k, v in weights.items() if k in state.base or k in state.local})
    notes = [f"base version {state.base_kept} with {len(state.local)} local tensors of device {state.name}"]
    if filled:
        notes.append(f"initial values (the device has none of its own): {', '.join(filled)}")
    return spec, weights, notes


def main(args: argparse.Namespace) -> int:
    try:
        spec, weights, notes = personalized_model(args.state)
        written = write_model(args.out, spec, weights, args.format)
    except (ModelError, WeightError, StateError, StoreError, ExportError, OSError) as e:
        print(f"fedpers-client export: {e}", file=sys.stderr)
        return 2
    print_written(written, notes, args.json)
    return 0
