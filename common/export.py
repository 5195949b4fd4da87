"""Models out: a model's weights written as .npz (by fedpers name) or in NNTrainer's own layout
(a .bin NNTrainer loads, next to an .ini NNTrainer reads, whose Save_Path names the .bin), and
weights read back from either. The device's and the server's `export` commands, and `predict` /
`evaluate`, go through here; the layout itself is `fedpers.nn.nntrainer_format`.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .nn.errors import WeightError
from .nn.spec import ModelSpec
from .store import atomic_write_bytes

log = logging.getLogger(__name__)

FORMATS = {"npz": "weights by fedpers name (<layer>.weight, ...), numpy .npz",
           "nntrainer": "NNTrainer's weight file (.bin) and a model file NNTrainer reads (.ini) next to it"}


class ExportError(ValueError):
    """The model cannot be written where or how it was asked (the message says why)."""


@dataclass(frozen=True)
class Written:
    """What an export wrote, and what the written model leaves out or fills in."""

    paths: tuple[Path, ...]
    notes: tuple[str, ...] = ()


def format_of(path: str | os.PathLike, fmt: str | None) -> str:
    """The format asked for, else the one the file name says (.npz -> npz, .bin / .ini -> nntrainer)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ExportError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".bin", ".ini"):
        return "nntrainer"
    raise ExportError(f"{path}: say --format npz|nntrainer, or name the file .npz or .bin")


def complete(spec: ModelSpec, have: Mapping[str, np.ndarray], seed: int = 0) -> tuple[dict[str, np.ndarray],
                                                                                     list[str]]:
    """Every weight of `spec`: those in `have` (names and shapes checked), the model's initial values
    (seed 0, as a device starts) for the rest; returns the weights and the names filled in."""
    from .nn.graph import init_weights

    init = init_weights(spec, seed)
    unknown = sorted(set(have) - set(init))
    if unknown:
        raise WeightError(f"weights the model does not have: {', '.join(unknown)}")
    out: dict[str, np.ndarray] = {}
    filled = []
    for name, value in init.items():
        if name in have:
            arr = np.asarray(have[name], np.float32)
            if arr.shape != value.shape:
                raise WeightError(f"weight {name} has shape {arr.shape}, the model says {value.shape}")
            out[name] = arr
        else:
            out[name] = value
            filled.append(name)
    return out, filled


def print_written(written: Written, notes: list[str], as_json: bool, **extra: object) -> None:
    """What an export command prints: the paths and notes, as lines or one JSON object (with `extra`)."""
    import json

    notes = notes + list(written.notes)
    if as_json:
        print(json.dumps({"paths": [str(p) for p in written.paths], **extra, "notes": notes}))
        return
    for p in written.paths:
        print(f"wrote {p}")
    for n in notes:
        print(f"note: {n}")


def write_model(path: str | os.PathLike, spec: ModelSpec, weights: Mapping[str, np.ndarray],
                fmt: str | None = None) -> Written:
    """Write `weights` (every weight of `spec`) as `fmt`, atomically. nntrainer: PATH.bin plus
    PATH.ini whose Save_Path is the .bin, so NNTrainer's load(ini, MODEL_FORMAT_INI_WITH_BIN) finds it."""
    from .nn.ini import nntrainer_ini
    from .nn.nntrainer_format import encode_bin

    p = Path(path)
    kind = format_of(p, fmt)
    if p.parent and not p.parent.is_dir():
        raise ExportError(f"{p.parent}: no such folder")
    if kind == "npz":
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v, np.float32) for k, v in weights.items()})
        atomic_write_bytes(p, buf.getbuffer())
        return Written((p,))
    bin_path, ini_path = p.with_suffix(".bin"), p.with_suffix(".ini")
    data = encode_bin(spec, dict(weights))
    text, left = nntrainer_ini(replace(spec, save_path=bin_path.name))
    atomic_write_bytes(bin_path, data)
    atomic_write_bytes(ini_path, text.encode("utf-8"))
    return Written((bin_path, ini_path), tuple(f"left out of {ini_path.name}: {x}" for x in left))


def read_weights(path: str | os.PathLike, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Weights from a .npz (by fedpers name) or an NNTrainer .bin laid out for `spec`."""
    from .nn.nntrainer_format import load_bin

    p = Path(path)
    if not p.is_file():
        raise WeightError(f"{p}: no such weights file")
    if p.suffix.lower() == ".bin":
        return load_bin(p, spec).weights
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise WeightError(f"{p}: not a readable .npz weights file ({e})") from None
