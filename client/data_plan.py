"""The digits for a simulation of any size: the non-IID split while it fits, examples drawn with replacement past it.

scikit-learn's digits hold 1,797 examples. `partition.partition_digits` gives every device examples of its
own and stops fitting near 360 devices (at least 5 each). Past that, `sampled_digits` gives each device
`SAMPLED_TRAIN` training and `SAMPLED_TEST` held-out examples drawn with replacement: training images
from 80% of the digits, held-out images from the other 20% (no device tests on an image any device
trains on), labels in the device's own Dirichlet(alpha) proportions, then the device's own rotation and
shift as in `partition.py`. Devices then share underlying images, each seen through its own distortion;
the simulator prints which plan it used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedpers.client.partition import (
    MAX_ANGLE_DEG,
    MAX_SHIFT_PX,
    DeviceSplit,
    Distortion,
    PartitionError,
    distort,
    load_digits_arrays,
    partition_digits,
    write_partition,
)

log = logging.getLogger(__name__)

SAMPLED_TRAIN = 40  # training examples per device when sampling
SAMPLED_TEST = 10  # held-out examples per device when sampling
POOL_TEST_FRACTION = 0.2  # share of the digits only ever drawn as held-out examples
NUM_CLASSES = 10
DIGITS = 1797  # examples in scikit-learn's bundled digits


@dataclass(frozen=True)
class DataPlan:
    """How a simulation's devices get their data: `split` (examples of their own) or `sampled`."""

    kind: str  # split | sampled
    devices: int
    train_per_device: int = SAMPLED_TRAIN
    test_per_device: int = SAMPLED_TEST

    def describe(self) -> str:
        """One line for the run's output and report."""
        if self.kind == "split":
            return (f"data: the {self.devices}-way non-IID split of the 1,797 digits (Dirichlet label skew, "
                    "per-device rotation and shift; each example on one device)")
        return (f"data: {self.devices} devices x {self.train_per_device} train / {self.test_per_device} held-out "
                "examples drawn with replacement from the 1,797 digits (train from 80%, held-out from the other "
                "20%; Dirichlet label mix and rotation/shift per device): devices share images, each distorted "
                "its own way")


def plan_for(devices: int, alpha: float = 0.5) -> DataPlan:
    """`split` when the non-IID split gives every device at least its minimum, else `sampled`."""
    min_size = max(5, min(40, DIGITS // (2 * max(devices, 1))))  # partition_digits' own minimum
    return DataPlan("split" if devices * min_size <= DIGITS else "sampled", devices)


def sampled_digits(n_devices: int, seed: int = 0, alpha: float = 0.5, train: int = SAMPLED_TRAIN,
                   test: int = SAMPLED_TEST) -> Iterator[DeviceSplit]:
    """Device i's split, drawn with replacement (see the module docstring); device i's data depends
    only on (seed, i), not on how many devices there are."""
    if n_devices < 1 or train < 1 or test < 1:
        raise PartitionError(f"need devices, train and test >= 1, got {n_devices}, {train}, {test}")
    if alpha <= 0:
        raise PartitionError(f"alpha must be > 0, got {alpha}")
    x, y = load_digits_arrays()
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(round(len(y) * (1 - POOL_TEST_FRACTION)))
    pools = {"train": order[:cut], "test": order[cut:]}
    by_class = {part: [idx[y[idx] == c] for c in range(NUM_CLASSES)] for part, idx in pools.items()}
    for i in range(n_devices):
        rng = np.random.default_rng([seed, i])
        mix = rng.dirichlet(np.full(NUM_CLASSES, alpha))
        dist = Distortion(round(float(rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG)), 3),
                          (int(rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1)),
                           int(rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1))))
        drawn = {}
        for part, count in (("train", train), ("test", test)):
            labels = rng.choice(NUM_CLASSES, size=count, p=mix)
            idx = np.array([rng.choice(by_class[part][c]) for c in labels], dtype=np.int64)
            drawn[part] = (np.ascontiguousarray(distort(x[idx], dist)), y[idx])
        yield DeviceSplit(drawn["train"][0], drawn["train"][1], drawn["test"][0], drawn["test"][1], dist)


def write_plan(plan: DataPlan, out_dir: str | os.PathLike, seed: int = 0, alpha: float = 0.5,
               input_shape: tuple[int, ...] | None = None) -> list[Path]:
    """Write `device-<i>.npz` (x, y, x_test, y_test) for every device of `plan`, one at a time, fitted to
    `input_shape` when given (`partition.fit_to_input`)."""
    splits = (partition_digits(plan.devices, seed=seed, alpha=alpha) if plan.kind == "split"
              else sampled_digits(plan.devices, seed, alpha, plan.train_per_device, plan.test_per_device))
    paths = write_partition(out_dir, splits, input_shape)  # one split at a time: `splits` is lazy past the split plan
    log.info("%s: %d device files in %s", plan.kind, len(paths), out_dir)
    return paths
