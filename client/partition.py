"""The demo's data: scikit-learn's bundled handwritten digits split across devices, non-IID.

Two kinds of skew so that personalization matters: label skew (each class is spread over the
devices in Dirichlet(alpha) proportions, so a device sees a few classes often and others
rarely) and a fixed per-device distortion (a small rotation and a one-pixel shift, as if each
device had its own camera). Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedpers.client.data import holdout_split

log = logging.getLogger(__name__)

MAX_ANGLE_DEG = 25.0
MAX_SHIFT_PX = 1


class PartitionError(ValueError):
    """The requested split cannot be made (e.g. more devices than the data allows)."""


class FitError(PartitionError):
    """The digits cannot be fitted to a model's input shape; the message names the shape and why."""


@dataclass(frozen=True)
class Distortion:
    """A device's fixed view of the world: rotation about the image centre, then a pixel shift."""

    angle_deg: float
    shift: tuple[int, int]  # (rows, cols)


@dataclass(frozen=True)
class DeviceSplit:
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    distortion: Distortion


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 bundled 8x8 digits as x float32 (N, 1, 8, 8) in [0, 1] and y int64 (N,)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    return np.ascontiguousarray(x), np.asarray(bunch.target, dtype=np.int64)


def dirichlet_split(
    y: np.ndarray, n_devices: int, alpha: float, rng: np.random.Generator, min_size: int, max_tries: int = 1000
) -> list[np.ndarray]:
    """Indices per device: each class split in Dirichlet(alpha) proportions, redrawn until every
    device has at least `min_size` examples. When no draw manages that (small alpha, many devices),
    the draw with the largest smallest device is topped up: each short device gets random examples of
    the currently largest devices, so the skew of the draw stays and no device falls below `min_size`."""
    if n_devices <= 0:
        raise PartitionError(f"need at least one device, got {n_devices}")
    if alpha <= 0:
        raise PartitionError(f"alpha must be > 0, got {alpha}")
    if n_devices * min_size > y.shape[0]:
        raise PartitionError(f"{y.shape[0]} examples cannot give {n_devices} devices {min_size} each")
    classes = np.unique(y)
    best: list[np.ndarray] | None = None
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(n_devices, alpha))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for d, piece in enumerate(np.split(idx, cuts)):
                parts[d].append(piece)
        out = [np.sort(np.concatenate(pieces)) for pieces in parts]
        if min(o.size for o in out) >= min_size:
            return out
        if best is None or min(o.size for o in out) > min(b.size for b in best):
            best = out
    assert best is not None
    log.info("no Dirichlet(%s) draw gave all %d devices %d examples; topping up the short ones", alpha, n_devices,
             min_size)
    return _top_up(best, min_size, rng)


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random examples from the largest devices to those below `min_size` (one loop per short device)."""
    parts = [rng.permutation(p) for p in parts]
    for d in np.argsort([p.size for p in parts], kind="stable"):
        while parts[d].size < min_size:
            donor = int(np.argmax([p.size for p in parts]))
            give = min(min_size - parts[d].size, parts[donor].size - min_size)
            parts[d] = np.concatenate((parts[d], parts[donor][:give]))
            parts[donor] = parts[donor][give:]
    return [np.sort(p) for p in parts]


def distort(x: np.ndarray, d: Distortion) -> np.ndarray:
    """Rotate each (C, H, W) image about its centre by d.angle_deg and shift it (bilinear, zero fill)."""
    n, c, h, w = x.shape
    theta = math.radians(d.angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    # inverse map: output pixel -> source position (undo the shift, then rotate back)
    ry, rx = rows - d.shift[0] - cy, cols - d.shift[1] - cx
    sy = cos * ry - sin * rx + cy
    sx = sin * ry + cos * rx + cx
    y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
    fy, fx = sy - y0, sx - x0
    out = np.zeros_like(x, dtype=np.float32)
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        src = x[:, :, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        out += (src * (wgt * ok)).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


def partition_digits(
    n_devices: int, seed: int = 0, alpha: float = 0.5, test_fraction: float = 0.2, min_size: int | None = None
) -> list[DeviceSplit]:
    """The digits split over `n_devices`: Dirichlet label skew + a per-device distortion + a test split."""
    x, y = load_digits_arrays()
    rng = np.random.default_rng(seed)
    if min_size is None:
        min_size = max(5, min(40, y.shape[0] // (2 * max(n_devices, 1))))
    parts = dirichlet_split(y, n_devices, alpha, rng, min_size)
    out = []
    for i, idx in enumerate(parts):
        angle = float(rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG))
        shift = (int(rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1)), int(rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1)))
        dist = Distortion(round(angle, 3), shift)
        xi = distort(x[idx], dist)
        x_tr, y_tr, x_te, y_te = holdout_split(xi, y[idx], test_fraction, seed=seed * 1000 + i)
        out.append(DeviceSplit(np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te, dist))
    return out


def fit_to_input(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """The (N, 1, 8, 8) digits as (N, *input_shape) for a model's input: C:H:W with H, W >= 8 by nearest-
    neighbour upsampling and the grey channel repeated C times; 1:1:F flattened, after upsampling to a square
    side when F is one (784 = 28x28). FitError names the shape when neither works (smaller images would
    lose the digits, other sizes have no honest layout)."""
    n, c, h, w = x.shape
    shape = tuple(int(d) for d in input_shape)
    what = ":".join(map(str, shape))
    if len(shape) != 3:
        raise FitError(f"the model's input {what} is not C:H:W; the digits are {c}:{h}:{w} images")
    if shape[:2] == (1, 1) and shape[2] != h * w:
        side = math.isqrt(shape[2])
        if side * side != shape[2] or side < h:
            raise FitError(f"the model's input {what} is a vector of {shape[2]} features: the {h}x{w} digits fit "
                           f"one of {h * w} features, or of a square side >= {h} (e.g. 784 = 28x28), not {shape[2]}")
        return fit_to_input(x, (1, side, side)).reshape(n, 1, 1, side * side)
    if shape[:2] == (1, 1):
        return np.ascontiguousarray(x.reshape(n, 1, 1, h * w), dtype=np.float32)
    channels, rows, cols = shape
    if rows < h or cols < w:
        raise FitError(f"the model's input {what} is smaller than the {h}x{w} digits: downsampling would lose them "
                       f"(use a model whose input is at least {c}:{h}:{w})")
    r = (np.arange(rows) * h) // rows
    k = (np.arange(cols) * w) // cols
    big = x[:, :, r[:, None], k[None, :]]
    return np.ascontiguousarray(np.repeat(big, channels // c, axis=1) if channels != c else big, dtype=np.float32)


def device_path(out_dir: str | os.PathLike, index: int) -> Path:
    return Path(out_dir) / f"device-{index}.npz"


def write_device(out_dir: str | os.PathLike, index: int, arrays: dict[str, np.ndarray]) -> Path:
    """Write `device-<index>.npz` atomically (temp file, then rename)."""
    path = device_path(out_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def write_partition(out_dir: str | os.PathLike, splits: Iterable[DeviceSplit],
                    input_shape: tuple[int, ...] | None = None) -> list[Path]:
    """Write `device-<i>.npz` (x, y, x_test, y_test) for each split, fitted to `input_shape` when given
    (`fit_to_input`); returns the paths."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = []

    def fit(a: np.ndarray) -> np.ndarray:
        return a if input_shape is None else fit_to_input(a, input_shape)

    for i, s in enumerate(splits):
        path = write_device(out_dir, i, dict(x=fit(s.x), y=s.y, x_test=fit(s.x_test), y_test=s.y_test))
        counts = np.bincount(s.y, minlength=10)
        log.info("%s: %d train / %d test, rotation %+.1f deg, shift %s, labels %s",
                 path.name, s.y.size, s.y_test.size, s.distortion.angle_deg, s.distortion.shift, counts.tolist())
        paths.append(path)
    return paths
