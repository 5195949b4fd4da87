"""--memory-budget is the whole process's peak RSS: checked from outside on real training runs.

Each run is a `fedpers-client train --json` process; its report carries the process's RSS high-water
mark over its whole life (VmHWM: start-up, warm-up, training and evaluation) and what the budget's
choice predicted. A budget below what is possible stops before training and names the smallest
budget that works; that budget then holds, and a roomier one buys a faster plan that also holds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MODELS = Path(__file__).resolve().parent.parent / "common" / "models"
MIB = 1 << 20


def data_file(tmp_path: Path, shape: tuple[int, ...], n: int = 64) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.standard_normal((n, *shape)).astype(np.float32), y=rng.integers(0, 10, n),
             x_test=rng.standard_normal((32, *shape)).astype(np.float32), y_test=rng.integers(0, 10, 32))
    return path


def train(model: str, data: Path, budget: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedpers.client", "train", str(MODELS / model), "--data", str(data), "--epochs", "1",
           "--batch", "32", "--no-shuffle", "--json", "--memory-budget", budget, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def smallest_named(proc: subprocess.CompletedProcess) -> int:
    assert proc.returncode == 2, proc.stderr
    m = re.search(r"raise the budget to at least (\d+)MiB", proc.stderr)
    assert m, proc.stderr
    assert "loss" not in proc.stdout  # nothing trained
    return int(m.group(1))


def held(proc: subprocess.CompletedProcess, budget_mib: int) -> dict:
    assert proc.returncode == 0, proc.stderr
    mem = json.loads(proc.stdout)["memory"]
    assert mem["budget_bytes"] == budget_mib * MIB
    assert mem["predicted_peak_bytes"] <= budget_mib * MIB
    assert mem["rss_process_peak_bytes"] <= budget_mib * MIB, (mem["rss_process_peak_bytes"] / MIB, budget_mib)
    return mem


def test_lenet_budget_below_possible_names_the_smallest_which_then_holds(tmp_path):
    data = data_file(tmp_path, (1, 28, 28))
    need = smallest_named(train("lenet5.ini", data, "20MiB", "--save-weights", str(tmp_path / "w.npz")))
    assert not (tmp_path / "w.npz").exists()
    held(train("lenet5.ini", data, f"{need}MiB", "--kernels", "numpy"), need)


@pytest.mark.slow
def test_vgg_budget_picks_a_plan_that_holds_and_a_roomier_one_a_faster_plan(tmp_path):
    """VGG-small b32: the smallest budget needs swap-all and many micro-batches; 25 MiB more buys
    fewer micro-batches; both stay under their budget, start-up and evaluation included."""
    data = data_file(tmp_path, (3, 32, 32))
    need = smallest_named(train("vgg_small.ini", data, "30MiB"))
    tight = held(train("vgg_small.ini", data, f"{need}MiB"), need)
    assert tight["mode"] == "swap-all" and tight["micro_batch"] > 1
    roomy = held(train("vgg_small.ini", data, f"{need + 25}MiB", "--kernels", "numpy"), need + 25)
    assert roomy["micro_batch"] < tight["micro_batch"] or roomy["mode"] != "swap-all"
