"""The local-only baseline: a fresh model trained on one device's data alone, for the same number of epochs.

`local_only` trains in this process; `run_baselines` runs one `fedpers-sim local-only` process per
device (at most one per core at a time, so they do not thrash), each with its own log file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from fedpers.client.processes import Child

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalOnlyResult:
    """Held-out accuracy and loss of a model trained only on the device's data."""

    accuracy: float
    loss: float
    epochs: int
    train_loss: float
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LocalOnlyResult:
        return cls(**json.loads(text))


def local_only(data_path: Path, model_path: Path, epochs: int, seed: int, memory: str = "planned") -> LocalOnlyResult:
    """Train a fresh model (all layers) on one device's training split; evaluate on its held-out split."""
    from fedpers.client.data import load_data
    from fedpers.nn import Trainer, load_ini

    data = load_data(data_path)
    spec = load_ini(model_path)
    t0 = time.perf_counter()
    with Trainer(spec, memory=memory, seed=seed) as trainer:
        fit = trainer.fit(data.x, data.y, epochs=epochs, seed=seed)
        ev = trainer.evaluate(data.x_test, data.y_test)
    return LocalOnlyResult(accuracy=float(ev.accuracy), loss=float(ev.loss), epochs=epochs,
                           train_loss=float(fit.loss), seconds=time.perf_counter() - t0)


def run_baselines(model: Path, data_paths: Sequence[Path], epochs: Sequence[int], seed: int, memory: str,
                  work: Path) -> list[LocalOnlyResult | None]:
    """One local-only process per device, device i seeded `seed + i`; None where a baseline failed
    (logged with the end of its log)."""

    def one(i: int) -> LocalOnlyResult | None:
        out = work / "devices" / str(i) / "local_only.json"
        argv = [sys.executable, "-m", "fedpers.client.sim", "local-only", "--data", str(data_paths[i]),
                "--model", str(model), "--epochs", str(max(1, epochs[i])), "--seed", str(seed + i),
                "--out", str(out), "--memory", memory]
        child = Child.start(f"local-only-{i}", argv, work / "logs" / f"local-only-{i}.log")
        code = child.proc.wait()
        child.stop()
        if code != 0:
            log.warning("local-only baseline of device %d failed (code %d):\n%s", i, code, child.tail())
            return None
        return LocalOnlyResult.from_json(out.read_text())

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="baseline") as pool:
        return list(pool.map(one, range(len(data_paths))))
