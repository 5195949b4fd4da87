"""A device's private data: load DATA.npz, validate it, and hold out a test split.

Keys: `x` float (N, C, H, W) or (N, F), `y` integer labels (N,), optionally `x_test`/`y_test`, and
with them `w_test`: a weight per test example (the test accuracy is then the weighted share right,
e.g. a shared test pool weighted by this device's label distribution, as the simulator's scenarios
write it). Without test keys the device holds out a seeded 20% itself. Every problem is a DataError that
names the file, the key and what is wrong, so a bad file never reaches the trainer.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fedpers.nn import DataError  # one error kind for bad data, file or array

__all__ = ["DataError", "Dataset", "check_against_model", "evaluate_on_test", "holdout_split", "load_data",
           "load_model_data"]

HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """Training and held-out arrays of one device."""

    x: np.ndarray  # float32, C-contiguous
    y: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    held_out_by_device: bool  # True when the file had no test keys and we split it ourselves
    w_test: np.ndarray | None = None  # float64 weights of the test examples, summing to 1 (None: all equal)

    @property
    def num_examples(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])


def _features(path: str, key: str, value: np.ndarray) -> np.ndarray:
    if value.dtype.kind not in "fiu" or value.dtype.kind == "b":
        raise DataError(f"{path}: {key} must hold numbers, got dtype {value.dtype}")
    if value.ndim not in (2, 4):
        raise DataError(f"{path}: {key} must be (N, C, H, W) or (N, F), got shape {value.shape}")
    if value.shape[0] == 0:
        raise DataError(f"{path}: {key} has no examples")
    if 0 in value.shape[1:]:
        raise DataError(f"{path}: {key} has an empty feature dimension in shape {value.shape}")
    out = np.ascontiguousarray(value, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise DataError(f"{path}: {key} has {bad} non-finite values (NaN or Inf)")
    return out


def _labels(path: str, key: str, value: np.ndarray, n: int, x_key: str) -> np.ndarray:
    if value.dtype.kind not in "iu":
        raise DataError(f"{path}: {key} must hold integer class labels, got dtype {value.dtype}")
    if value.ndim != 1:
        raise DataError(f"{path}: {key} must be one label per example (N,), got shape {value.shape}")
    if value.shape[0] != n:
        raise DataError(f"{path}: {key} has {value.shape[0]} labels but {x_key} has {n} examples")
    if value.size and int(value.min()) < 0:
        raise DataError(f"{path}: {key} has negative labels (min {int(value.min())})")
    return value.astype(np.int64)


def _weights(path: str, value: np.ndarray, n: int) -> np.ndarray:
    if value.dtype.kind not in "fiu" or value.ndim != 1 or value.shape[0] != n:
        raise DataError(f"{path}: w_test must be one number per test example ({n},), got {value.dtype} {value.shape}")
    w = value.astype(np.float64)
    if not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise DataError(f"{path}: w_test must be finite, >= 0 and not all 0")
    return w / w.sum()


def evaluate_on_test(trainer: Any, data: Dataset) -> tuple[float, float]:
    """(loss, accuracy) of the trainer's current weights on the test split; with `w_test` the accuracy is
    the weighted share of examples predicted right (the loss stays the plain mean)."""
    ev = trainer.evaluate(data.x_test, data.y_test)
    if data.w_test is None:
        return float(ev.loss), float(ev.accuracy)
    right = trainer.predict(data.x_test).argmax(axis=1) == data.y_test
    return float(ev.loss), float(np.dot(data.w_test, right))


def holdout_split(
    x: np.ndarray, y: np.ndarray, fraction: float = HOLDOUT_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded split into (x_train, y_train, x_test, y_test); both sides keep at least one example."""
    n = int(y.shape[0])
    if n < 2:
        raise DataError(f"need at least 2 examples to hold out a test split, got {n}")
    n_test = min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return x[train], y[train], x[test], y[test]


def load_data(path: str | os.PathLike, holdout_seed: int = 0, holdout: float = HOLDOUT_FRACTION) -> Dataset:
    """Load and validate DATA.npz; without x_test/y_test, hold out the seeded fraction `holdout` of the
    examples as the test split. DataError names the problem."""
    p = str(path)
    if not 0 < holdout < 1:
        raise DataError(f"the held-out fraction must be in (0, 1), got {holdout}")
    if Path(p).is_dir():
        raise DataError(f"{p}: is a directory, not a data file (expected DATA.npz)")
    if not Path(p).is_file():
        raise DataError(f"{p}: no such data file")
    with open(p, "rb") as fh:
        head = fh.read(64)
    if not head.startswith(b"PK"):  # every .npz is a zip archive
        hint = ""
        if head.lstrip()[:1] in (b"[", b"#"):
            hint = " (it looks like an INI model file: give the model as MODEL.ini and the data with --data)"
        elif head.startswith(b"\x93NUMPY"):
            hint = " (it is a single .npy array: save x and y together with numpy.savez)"
        raise DataError(f"{p}: not an .npz file{hint}")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{p}: not a readable .npz file ({exc})") from None
    known = {"x", "y", "x_test", "y_test", "w_test"}
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{p}: missing key {key!r} (found {sorted(arrays)}; expected x, y[, x_test, y_test])")
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise DataError(f"{p}: unknown keys {unknown}; expected x, y[, x_test, y_test[, w_test]]")
    x = _features(p, "x", arrays["x"])
    y = _labels(p, "y", arrays["y"], x.shape[0], "x")
    has_test = ("x_test" in arrays, "y_test" in arrays)
    if has_test[0] != has_test[1]:
        raise DataError(f"{p}: x_test and y_test come together; found only {'x_test' if has_test[0] else 'y_test'}")
    if has_test[0]:
        x_test = _features(p, "x_test", arrays["x_test"])
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{p}: x_test examples have shape {x_test.shape[1:]}, x examples {x.shape[1:]}")
        y_test = _labels(p, "y_test", arrays["y_test"], x_test.shape[0], "x_test")
        w_test = _weights(p, arrays["w_test"], y_test.shape[0]) if "w_test" in arrays else None
        return Dataset(x, y, x_test, y_test, held_out_by_device=False, w_test=w_test)
    if "w_test" in arrays:
        raise DataError(f"{p}: w_test weighs x_test/y_test, which the file does not have")
    x, y, x_test, y_test = holdout_split(x, y, holdout, holdout_seed)
    return Dataset(
        np.ascontiguousarray(x), y, np.ascontiguousarray(x_test), y_test, held_out_by_device=True
    )


def load_model_data(spec: Any, model_path: str | os.PathLike, holdout_seed: int = 0,
                    holdout: float = HOLDOUT_FRACTION) -> Dataset:
    """The data a model file names, in NNTrainer's raw format (paths relative to the model file):
    [train_set] (or [DataSet] TrainData) to train on, [valid_set] / [test_set] as the held-out split
    (else the seeded fraction `holdout` of the training file)."""
    from fedpers.nn.nntrainer_format import read_raw_data, resolve_data_path

    ds = spec.dataset
    if ds.train is None:
        raise DataError(f"no --data, and {model_path} names no training data ([train_set] path, or [DataSet] "
                        "TrainData)")
    x, y = read_raw_data(resolve_data_path(ds.train, model_path), spec)
    held = ds.valid or ds.test
    if held is not None:
        x_test, y_test = read_raw_data(resolve_data_path(held, model_path), spec)
        return Dataset(x, y, x_test, y_test, held_out_by_device=False)
    x, y, x_test, y_test = holdout_split(x, y, holdout, holdout_seed)
    return Dataset(np.ascontiguousarray(x), y, np.ascontiguousarray(x_test), y_test, held_out_by_device=True)


def check_against_model(data: Dataset, input_shape: tuple[int, ...], num_classes: int | None, path: str = "") -> None:
    """Refuse data the model cannot take: wrong example shape or labels beyond the output units."""
    where = f"{path}: " if path else ""
    want = tuple(int(d) for d in input_shape)
    got = data.input_shape
    # (N, F) data fits a model whose input is (1, 1, F) and vice versa: same number of features in order
    if got != want and not (len(got) == 1 and int(np.prod(want)) == got[0] and want[:-1] == (1,) * (len(want) - 1)):
        raise DataError(f"{where}examples have shape {got}, the model's input is {want}")
    if num_classes is not None:
        top = int(max(data.y.max(initial=0), data.y_test.max(initial=0)))
        if top >= num_classes:
            raise DataError(f"{where}label {top} is out of range for a model with {num_classes} outputs")
