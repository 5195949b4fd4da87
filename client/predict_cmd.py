"""`fedpers-client predict`: run a model over a data file and write its outputs (.npz or .csv).

The model and weights come from MODEL.ini with --weights (.npz by name, or NNTrainer's .bin), or
from a device's --state (its personalized model); the data from --data (DATA.npz or an NNTrainer
raw data file) or, without --data, the model's own [test_set] / [valid_set] file. `evaluate`
shares all of this (`inference_inputs`).
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedpers.argtypes import positive_int
from fedpers.export import ExportError, read_weights
from fedpers.nn import DataError, ModelError, ModelSpec, WeightError, load_ini
from fedpers.nn.nntrainer_format import read_raw_data, resolve_data_path
from fedpers.store import StoreError, atomic_write_bytes

from .personal import StateError

OUTPUT_SUFFIXES = (".npz", ".csv")


class UsageError(ValueError):
    """The command line does not say enough (no weights, no data...)."""


@dataclass
class Inference:
    """What predict / evaluate run: the model, its weights, where they came from, and the data."""

    spec: ModelSpec
    weights: dict[str, np.ndarray]
    model_path: Path
    x: np.ndarray
    y: np.ndarray | None
    data: str  # where the examples came from, for the report


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL.ini / --weights / --state / --data / --batch, shared by predict and evaluate."""
    p.add_argument("model", nargs="?", type=Path, metavar="MODEL.ini",
                   help="model file (default with --state: DIR/model.ini)")
    p.add_argument("--weights", type=Path, metavar="W", help="weights: .npz by name, or NNTrainer's .bin")
    p.add_argument("--state", type=Path, metavar="DIR",
                   help="a device's --state: its personalized model (base + personal layers)")
    p.add_argument("--data", type=Path, metavar="FILE",
                   help="DATA.npz or an NNTrainer raw data file (default: the model's [test_set], else "
                        "[valid_set])")
    p.add_argument("--batch", type=positive_int, default=None, metavar="B",
                   help="examples per step (default: [Model] batch_size)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="write a model's outputs on a data file (.npz or .csv)",
                              description=__doc__.splitlines()[0] + " " + " ".join(__doc__.splitlines()[2:5]))
    add_model_args(p)
    p.add_argument("--out", required=True, type=Path, metavar="PRED",
                   help="PRED.npz (outputs, and labels for Loss = cross) or PRED.csv (one row per example)")
    return p


def _npz_arrays(path: Path, labels: bool) -> tuple[np.ndarray, np.ndarray | None, str]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    split = "x_test" if labels and "x_test" in arrays else "x"
    if split not in arrays:
        raise DataError(f"{path}: no key 'x' (found {sorted(arrays)})")
    y_key = "y_test" if split == "x_test" else "y"
    if labels and y_key not in arrays:
        raise DataError(f"{path}: no key {y_key!r} to evaluate against (found {sorted(arrays)})")
    x = arrays[split]
    if x.dtype.kind not in "fiu":
        raise DataError(f"{path}: {split} must hold numbers, got dtype {x.dtype}")
    return x.astype(np.float32), arrays[y_key] if labels else None, f"{path} ({split})"


def inference_inputs(args: argparse.Namespace, labels: bool) -> Inference:
    """Resolve model, weights and data from the command line; typed errors name what is missing or wrong."""
    if args.state is not None:
        from .export_cmd import personalized_model

        spec, weights, _ = personalized_model(args.state)
        model_path = args.state / "model.ini"
        if args.model is not None:  # another model file over the device's weights (e.g. NNTrainer's own)
            spec, model_path = load_ini(args.model), args.model
        if args.weights is not None:
            weights = read_weights(args.weights, spec)
    else:
        if args.model is None or args.weights is None:
            raise UsageError("give MODEL.ini with --weights W, or a device's --state DIR")
        spec, model_path = load_ini(args.model), args.model
        weights = read_weights(args.weights, spec)
    if args.data is not None:
        if not args.data.is_file():
            raise DataError(f"{args.data}: no such data file")
        if args.data.suffix.lower() == ".npz":
            x, y, where = _npz_arrays(args.data, labels)
        else:
            x, y = read_raw_data(args.data, spec)
            where = f"{args.data} (NNTrainer raw data)"
    else:
        name = spec.dataset.test or spec.dataset.valid
        if name is None:
            raise UsageError(f"no --data, and {model_path} names no [test_set] or [valid_set] data file")
        path = resolve_data_path(name, model_path)
        x, y = read_raw_data(path, spec)
        where = f"{path} (the model's {'test' if spec.dataset.test else 'valid'} set)"
    return Inference(spec, weights, model_path, x, y, where)


def trainer_for(inf: Inference):  # -> fedpers.nn.Trainer
    """A Trainer holding exactly the given weights (every weight must be there)."""
    from fedpers.nn import Trainer

    trainer = Trainer(inf.spec, memory="planned")
    trainer.set_weights(inf.weights, strict=True)
    return trainer


ERRORS = (ModelError, DataError, WeightError, StateError, StoreError, ExportError, UsageError, OSError)


def write_predictions(path: Path, outputs: np.ndarray, classes: bool) -> None:
    """outputs (N, K) to .npz (outputs, labels) or .csv (label then the K values per row), atomically."""
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"{path}: name the output .npz or .csv")
    if path.parent and not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such folder")
    labels = outputs.argmax(axis=1) if classes else None
    if suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, outputs=outputs, **({"labels": labels} if labels is not None else {}))
        atomic_write_bytes(path, buf.getbuffer())
        return
    head = [f"out{k}" for k in range(outputs.shape[1])]
    lines = [",".join((["label"] if classes else []) + head)]
    for i, row in enumerate(outputs):
        vals = ",".join(f"{v:.9g}" for v in row)
        lines.append(f"{labels[i]},{vals}" if classes else vals)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def main(args: argparse.Namespace) -> int:
    try:
        inf = inference_inputs(args, labels=False)
        with trainer_for(inf) as trainer:
            outputs = trainer.predict(inf.x, batch_size=args.batch)
        write_predictions(args.out, outputs, inf.spec.loss == "cross")
    except ERRORS as e:
        print(f"fedpers-client predict: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(outputs)} predictions from {inf.data}")
    return 0
