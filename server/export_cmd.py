"""`fedpers-server export`: a model version from a server's --store as .npz or in NNTrainer's layout.

The store holds the shared and frozen tensors of each version; personal layers never reach the
server, so they are written with the model's initial values (as a device starts) and named in a
note. The model file is --model, else the copy the server keeps in the store (`model.ini`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

MODEL_COPY = "model.ini"  # the server keeps the model it federates here, in --store


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from fedpers.export import FORMATS

    p = sub.add_parser("export", help="write a model version from --store (.npz, or NNTrainer's .bin + .ini)",
                       description=__doc__.splitlines()[0] + " " + " ".join(__doc__.splitlines()[2:5]))
    p.add_argument("--store", required=True, type=Path, metavar="DIR", help="the server's --store directory")
    p.add_argument("--version", type=int, default=None, metavar="V", help="model version (default: the latest)")
    p.add_argument("--model", type=Path, default=None, metavar="MODEL.ini",
                   help=f"the model file (default: DIR/{MODEL_COPY}, which the server keeps)")
    p.add_argument("--out", required=True, type=Path, metavar="PATH", help="where to write (.npz or .bin)")
    p.add_argument("--format", choices=sorted(FORMATS), default=None,
                   help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()) + " (default: from PATH's suffix)")
    p.add_argument("--json", action="store_true", help="print one JSON object: paths, version, notes")
    return p


def version_model(store_dir: Path, version: int | None, model: Path | None) -> tuple[object, dict[str, np.ndarray],
                                                                                   int, list[str]]:
    """(spec, every weight, version, notes) of a stored version; StoreError / ModelError name the problem."""
    from fedpers.export import complete
    from fedpers.nn import load_ini
    from fedpers.store import MissingVersion, ModelStore, StoreError

    if not (store_dir / "models").is_dir():
        raise StoreError(f"{store_dir} is not a fedpers-server store (no models/ folder)")
    model = model or store_dir / MODEL_COPY
    if not model.is_file():
        raise StoreError(f"{model}: missing; pass the server's model file with --model")
    spec = load_ini(model)
    store = ModelStore.read_only(store_dir)  # a running server may be writing its next version
    v = store.latest_version() if version is None else version
    if v is None:
        raise MissingVersion(f"{store_dir} holds no model version yet")
    stored = store.load_version(v)
    weights, filled = complete(spec, stored.weights)
    notes = [f"version {v} of {store_dir}"]
    if filled:
        notes.append(f"initial values (personal layers never reach the server): {', '.join(filled)}")
    return spec, weights, v, notes


def main(ns: argparse.Namespace) -> int:
    from fedpers.export import ExportError, print_written, write_model
    from fedpers.nn import ModelError, WeightError
    from fedpers.store import StoreError

    try:
        spec, weights, version, notes = version_model(ns.store, ns.version, ns.model)
        written = write_model(ns.out, spec, weights, ns.format)
    except (StoreError, ModelError, WeightError, ExportError, OSError) as e:
        print(f"fedpers-server export: {e}", file=sys.stderr)
        return 2
    print_written(written, notes, ns.json, version=version)
    return 0
