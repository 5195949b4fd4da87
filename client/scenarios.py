"""Federations of devices on the shipped digits, one per kind of heterogeneity (issue 12).

Every scenario splits scikit-learn's bundled 8x8 digits the same way: a stratified test pool
(`test_fraction`) that no device ever trains on, and a training pool dealt to the devices (IID or
Dirichlet label skew, `client.partition.dirichlet_split`). Each device holds out `val_fraction` of
its own data (stratified, `client.methods.validation_split`) to choose what it serves.

A device's test set is the whole test pool seen through the device's eyes (its input transform,
its label map) and weighted by its own label distribution: per-device accuracy is then the expected
accuracy on the device's distribution, without the noise of a test set of a few dozen examples.
Classes the device never saw get weight 0.

| scenario      | what differs between devices                                        |
| ------------- | ------------------------------------------------------------------- |
| iid           | nothing (the control: FedAvg should win)                            |
| label_skew    | label proportions, Dirichlet(alpha)                                 |
| feature_shift | the input: each cluster's intensity response (+ optional per-device rotation/shift) |
| concept_shift | the labels: each cluster of devices permutes the 10 labels its own way |
| scarce        | tens of examples per device (20), many devices (60), labels IID       |

Everything is a deterministic function of the config (seed included).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from fedpers.client.methods import validation_split
from fedpers.client.partition import (
    Distortion,
    PartitionError,
    dirichlet_split,
    distort,
    fit_to_input,
    load_digits_arrays,
    write_device,
)

log = logging.getLogger(__name__)

CLASSES = 10
IDENTITY = tuple(range(CLASSES))
NO_DISTORTION = Distortion(0.0, (0, 0))


@dataclass(frozen=True)
class Intensity:
    """x -> clip(gain * x + offset, 0, 1): a camera's response (gain < 0 inverts)."""

    gain: float
    offset: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.float32(self.gain) * x + np.float32(self.offset), 0.0, 1.0).astype(np.float32)


# Cluster k of a feature shift sees CLUSTER_INTENSITY[k % len]: normal, faded on a bright background, dark, grey.
CLUSTER_INTENSITY = (Intensity(1.0, 0.0), Intensity(0.5, 0.5), Intensity(0.35, 0.0), Intensity(0.6, 0.2))


@dataclass(frozen=True)
class ScenarioConfig:
    """The knobs of a scenario (each scenario has its own defaults, `DEFAULTS`)."""

    devices: int = 20
    alpha: float | None = None  # Dirichlet label skew; None deals labels IID
    min_examples: int = 10  # every device gets at least this many (training + validation)
    examples: int | None = None  # cap per device (scarce data); None deals the whole training pool
    clusters: int = 4  # feature / concept shift: groups of devices sharing a transform or a label map
    jitter_deg: float = 0.0  # feature shift: each device's own rotation, uniform in [-jitter_deg, jitter_deg]
    jitter_px: int = 0  # feature shift: each device's own shift, up to this many pixels each way
    val_fraction: float = 0.2
    test_fraction: float = 0.25  # of the digits, kept as the test pool
    seed: int = 0

    def __post_init__(self) -> None:
        if self.devices < 1 or self.min_examples < 2 or self.clusters < 1:
            raise PartitionError("devices >= 1, min_examples >= 2 and clusters >= 1 are required")
        if self.examples is not None and self.examples < self.min_examples:
            raise PartitionError(f"examples ({self.examples}) must be >= min_examples ({self.min_examples})")
        if not 0.0 < self.test_fraction < 1.0 or not 0.0 <= self.val_fraction < 1.0:
            raise PartitionError("test_fraction must be in (0, 1) and val_fraction in [0, 1)")


@dataclass(frozen=True)
class Device:
    """One device: its training and validation data, and its weighted view of the test pool."""

    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    w_test: np.ndarray  # per test example, sums to 1: the device's label distribution over the pool
    cluster: int = 0
    label_map: tuple[int, ...] = IDENTITY  # true class -> the label this device uses
    intensity: Intensity = CLUSTER_INTENSITY[0]
    distortion: Distortion = NO_DISTORTION
    source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # digits indices of x
    source_val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ... of x_val
    source_test: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ... of x_test

    @property
    def examples(self) -> int:
        """Training + validation examples (the device's data)."""
        return int(self.y.size + self.y_val.size)


@dataclass(frozen=True)
class Scenario:
    name: str
    config: ScenarioConfig
    devices: list[Device] = field(default_factory=list)


def weighted_accuracy(probs: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Sum of the weights of the correctly predicted examples."""
    return float(np.dot(w, probs.argmax(1) == y))


@dataclass(frozen=True)
class Pools:
    """The digits and the stratified split of their indices into a training and a test pool."""

    x: np.ndarray
    y: np.ndarray
    train: np.ndarray
    test: np.ndarray


def _pools(cfg: ScenarioConfig) -> Pools:
    x, y = load_digits_arrays()
    rng = np.random.default_rng([cfg.seed, 1])
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: round(cfg.test_fraction * np.sum(y == c))]
                           for c in range(CLASSES)])
    mask = np.ones(y.size, bool)
    mask[test] = False
    return Pools(x, y, np.flatnonzero(mask), np.sort(test))


def _deal(pools: Pools, cfg: ScenarioConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Digits indices per device from the training pool: IID or Dirichlet(alpha), then capped at `examples`."""
    y = pools.y[pools.train]
    if cfg.alpha is None:
        order = rng.permutation(y.size)
        n = y.size if cfg.examples is None else min(y.size, cfg.examples * cfg.devices)
        parts = np.array_split(order[:n], cfg.devices)
        if min(p.size for p in parts) < cfg.min_examples:
            raise PartitionError(f"{y.size} training examples cannot give {cfg.devices} devices "
                                 f"{cfg.min_examples} each")
    else:
        parts = dirichlet_split(y, cfg.devices, cfg.alpha, rng, cfg.min_examples)
    if cfg.examples is not None:
        parts = [rng.permutation(p)[: cfg.examples] for p in parts]
    return [np.sort(pools.train[p]) for p in parts]


def _device(pools: Pools, idx: np.ndarray, cfg: ScenarioConfig, seed: int, cluster: int = 0,
            label_map: tuple[int, ...] = IDENTITY, intensity: Intensity = CLUSTER_INTENSITY[0],
            distortion: Distortion = NO_DISTORTION) -> Device:
    """A device from the digits it owns (`idx`): transform, relabel, hold out validation, weight the test pool."""

    def view(a: np.ndarray) -> np.ndarray:
        out = a if distortion == NO_DISTORTION else distort(a, distortion)
        return np.ascontiguousarray(intensity(out))

    lmap = np.asarray(label_map, np.int64)
    y = pools.y[idx]
    tr, _, val, _ = validation_split(idx, y, cfg.val_fraction, seed)
    share = np.bincount(y, minlength=CLASSES) / y.size  # the device's class distribution (true classes)
    y_pool = pools.y[pools.test]
    keep = share[y_pool] > 0
    test = pools.test[keep]
    w = share[pools.y[test]] / np.bincount(y_pool, minlength=CLASSES)[pools.y[test]]
    return Device(view(pools.x[tr]), lmap[pools.y[tr]], view(pools.x[val]), lmap[pools.y[val]], view(pools.x[test]),
                  lmap[pools.y[test]], (w / w.sum()).astype(np.float64), cluster, tuple(int(v) for v in lmap),
                  intensity, distortion, tr, val, test)


def _plain(name: str, cfg: ScenarioConfig) -> Scenario:
    pools = _pools(cfg)
    parts = _deal(pools, cfg, np.random.default_rng([cfg.seed, 2]))
    return Scenario(name, cfg, [_device(pools, p, cfg, cfg.seed * 1000 + i) for i, p in enumerate(parts)])


def iid(cfg: ScenarioConfig) -> Scenario:
    """Labels dealt uniformly at random, no transform: the control."""
    return _plain("iid", replace(cfg, alpha=None))


def label_skew(cfg: ScenarioConfig) -> Scenario:
    """Dirichlet(alpha) label proportions per device."""
    if cfg.alpha is None:
        raise PartitionError("label_skew needs alpha")
    return _plain("label_skew", cfg)


def scarce(cfg: ScenarioConfig) -> Scenario:
    """Tens of examples per device (`examples`), many devices."""
    if cfg.examples is None:
        raise PartitionError("scarce needs examples (per device)")
    return _plain("scarce", cfg)


def feature_shift(cfg: ScenarioConfig) -> Scenario:
    """Device i is in cluster i % clusters and sees the digits through that cluster's intensity
    response (CLUSTER_INTENSITY) and its own small rotation (up to jitter_deg) and shift (up to jitter_px)."""
    pools = _pools(cfg)
    rng = np.random.default_rng([cfg.seed, 3])
    parts = _deal(pools, cfg, rng)
    out = []
    for i, p in enumerate(parts):
        k = i % cfg.clusters
        d = Distortion(round(float(rng.uniform(-cfg.jitter_deg, cfg.jitter_deg)), 3),
                       (int(rng.integers(-cfg.jitter_px, cfg.jitter_px + 1)),
                        int(rng.integers(-cfg.jitter_px, cfg.jitter_px + 1))))
        out.append(_device(pools, p, cfg, cfg.seed * 1000 + i, cluster=k,
                           intensity=CLUSTER_INTENSITY[k % len(CLUSTER_INTENSITY)], distortion=d))
    return Scenario("feature_shift", cfg, out)


def label_maps(clusters: int, seed: int) -> list[tuple[int, ...]]:
    """Cluster 0 keeps the labels; every other cluster permutes them (a derangement: no label keeps its
    meaning), each differently, from the seed."""
    rng = np.random.default_rng([seed, 4])
    maps = [tuple(range(CLASSES))]
    while len(maps) < clusters:
        p = rng.permutation(CLASSES)
        if np.all(p != np.arange(CLASSES)) and tuple(p) not in maps:
            maps.append(tuple(int(v) for v in p))
    return maps


def concept_shift(cfg: ScenarioConfig) -> Scenario:
    """Device i is in cluster i % clusters; the same image means a different label in every cluster."""
    pools = _pools(cfg)
    parts = _deal(pools, cfg, np.random.default_rng([cfg.seed, 5]))
    maps = label_maps(cfg.clusters, cfg.seed)
    return Scenario("concept_shift", cfg, [
        _device(pools, p, cfg, cfg.seed * 1000 + i, cluster=i % cfg.clusters,
                label_map=maps[i % cfg.clusters])
        for i, p in enumerate(parts)])


SCENARIOS = {"iid": iid, "label_skew": label_skew, "feature_shift": feature_shift,
             "concept_shift": concept_shift, "scarce": scarce}

# Defaults per scenario, chosen for the benchmark (docs/personalization.md says how): 40 devices share the
# 1347 training digits (~34 each: the regime where a device alone is short of data).
DEFAULTS: dict[str, ScenarioConfig] = {
    "iid": ScenarioConfig(devices=40),
    "label_skew": ScenarioConfig(devices=40, alpha=0.1),
    "feature_shift": ScenarioConfig(devices=40),
    "concept_shift": ScenarioConfig(devices=40),
    "scarce": ScenarioConfig(devices=60, examples=20),
}


KNOBS = ("alpha", "min_examples", "examples", "clusters", "jitter_deg", "jitter_px")  # what fedpers-sim exposes


def device_arrays(dev: Device, input_shape: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """A device as DATA.npz arrays: its data (training + validation: the device holds out its own validation
    split), the test pool through its eyes and its weights (`w_test`), fitted to a model's input shape."""

    def fit(a: np.ndarray) -> np.ndarray:
        return a if input_shape is None else fit_to_input(a, input_shape)

    return dict(x=fit(np.concatenate([dev.x, dev.x_val])), y=np.concatenate([dev.y, dev.y_val]),
                x_test=fit(dev.x_test), y_test=dev.y_test, w_test=dev.w_test)


def write_scenario(out_dir: Path, scenario: Scenario, input_shape: tuple[int, ...] | None = None) -> list[Path]:
    """`device-<i>.npz` per device of the scenario (`device_arrays`); returns the paths."""
    paths = []
    for i, dev in enumerate(scenario.devices):
        paths.append(write_device(out_dir, i, device_arrays(dev, input_shape)))
        log.info("%s device %d: %d examples, cluster %d", scenario.name, i, dev.examples, dev.cluster)
    return paths


def make(name: str, seed: int = 0, **knobs) -> Scenario:
    """Scenario `name` with its defaults, the seed and any knob overridden (ScenarioConfig's fields)."""
    if name not in SCENARIOS:
        raise PartitionError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    cfg = replace(DEFAULTS[name], seed=seed, **knobs)
    return SCENARIOS[name](cfg)
