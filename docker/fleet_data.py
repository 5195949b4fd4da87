"""The fleet's one-shot data step: the simulator's non-IID digits split, one directory per device.

Runs inside the image as the compose service `data`. Each `OUT/<name>/` is that device's own named
volume, so a device container sees its own `data.npz` and nothing else. The split is
`client.partition.partition_digits` with the simulator's defaults (`fedpers-sim partition`); the
8x8 images are then upsampled (nearest neighbour) to the fleet model's input size, and each
device keeps at most `--max-train` / `--max-test` examples so that rounds stay short.

    python fleet_data.py --out /out --image-size 32 --devices device-0 device-1 device-small
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("fedpers.fleet_data")

DATA_FILE = "data.npz"


def upsample(x: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
    """(N, 1, h, w) -> (N, channels, size, size) by nearest neighbour; the grey channel is repeated."""
    n, c, h, w = x.shape
    if c != 1:
        raise ValueError(f"expected one grey channel, got {c}")
    rows = (np.arange(size) * h) // size
    cols = (np.arange(size) * w) // size
    big = x[:, :, rows[:, None], cols[None, :]]
    return np.ascontiguousarray(np.repeat(big, channels, axis=1), dtype=np.float32)


def subsample(
    x: np.ndarray, y: np.ndarray, limit: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """At most `limit` examples, drawn without replacement (order kept)."""
    if limit is None or y.shape[0] <= limit:
        return x, y
    keep = np.sort(rng.choice(y.shape[0], size=limit, replace=False))
    return x[keep], y[keep]


def write_device(out: Path, name: str, arrays: dict[str, np.ndarray]) -> Path:
    """Write OUT/<name>/data.npz atomically, read-only for everyone."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DATA_FILE
    tmp = folder / f".{DATA_FILE}.tmp.npz"
    np.savez(tmp, **arrays)
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet_data", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="one sub-directory per device is written here")
    p.add_argument("--devices", nargs="+", required=True, metavar="NAME", help="device names, in partition order")
    p.add_argument("--seed", type=int, default=0, help="partition seed (default 0, as fedpers-sim)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (default 0.5, as fedpers-sim)")
    p.add_argument("--image-size", type=int, default=8, help="upsample the 8x8 digits to SxS (default 8: as is)")
    p.add_argument("--channels", type=int, default=1, help="repeat the grey channel C times (default 1)")
    p.add_argument("--max-train", type=int, default=None, help="keep at most N training examples per device")
    p.add_argument("--max-test", type=int, default=None, help="keep at most N held-out examples per device")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(set(args.devices)) != len(args.devices):
        p.error(f"device names repeat: {args.devices}")
    if args.image_size < 8 or args.channels < 1:
        p.error("--image-size must be >= 8 and --channels >= 1")

    from fedpers.client.partition import PartitionError, partition_digits

    try:
        splits = partition_digits(len(args.devices), seed=args.seed, alpha=args.alpha)
    except PartitionError as exc:
        print(f"fleet_data: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    for name, s in zip(args.devices, splits, strict=True):
        x, y = subsample(s.x, s.y, args.max_train, rng)
        x_test, y_test = subsample(s.x_test, s.y_test, args.max_test, rng)
        path = write_device(args.out, name, {
            "x": upsample(x, args.image_size, args.channels), "y": y,
            "x_test": upsample(x_test, args.image_size, args.channels), "y_test": y_test,
        })
        log.info("%s: %d train / %d test examples of %dx%dx%d, labels %s", path, y.size, y_test.size,
                 args.channels, args.image_size, args.image_size, np.bincount(y, minlength=10).tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
