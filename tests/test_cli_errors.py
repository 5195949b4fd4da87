"""Mistakes a new user made, each run as the command: exit 2 (or the stated code) with a message, no traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fedpers import models
from fedpers.server import app
from fedpers.server.config import ServerConfig

from tests.server_helpers import client_tls_args, server_tls

MLP = models.path("mlp.ini")
TOKEN = "cli-errors-token"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mlp.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((40, 784), dtype=np.float32), y=rng.integers(0, 10, 40),
             x_test=rng.random((10, 784), dtype=np.float32), y_test=rng.integers(0, 10, 10))
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["train", "MODEL", "--data", "DATA", "--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["train", "MODEL", "--data", "DATA", "--epochs", "-1"], "argument --epochs: must be a positive integer"),
    (["train", "MODEL", "--data", "DATA", "--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    (["train", "DIR", "--data", "DATA"], "is a directory, not a model file"),
    (["train", "DATA", "--data", "DATA"], "is an .npz archive (data or weights?): a model file is NNTrainer-style"),
    (["train", "MODEL", "--data", "MODEL"], "not an .npz file (it looks like an INI model file"),
    (["plan", "MISSING"], "no such model file"),
    (["run", "--server", "nohostport", "--data", "DATA", "--state", "DIR/state"], "expected HOST:PORT"),
    (["run", "--server", "no-such-host.invalid:50051", "--data", "DATA", "--state", "DIR/s", "--insecure"],
     "cannot resolve 'no-such-host.invalid'"),
])
def test_device_command_errors_exit_2(args, message, data, tmp_path) -> None:
    subst = {"MODEL": str(MLP), "DATA": str(data), "DIR": str(tmp_path), "MISSING": str(tmp_path / "none.ini")}
    argv = [a.replace("DIR", str(tmp_path)) if a.startswith("DIR/") else subst.get(a, a) for a in args]
    t0 = time.monotonic()
    proc = run("fedpers.client", *argv)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 60  # refused at once, not after retries


def test_plan_png_into_a_missing_folder_is_made(tmp_path) -> None:
    png = tmp_path / "new" / "folder" / "plan.png"
    proc = run("fedpers.client", "plan", str(MLP), "--png", str(png))
    assert proc.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def server(tmp_path):
    cfg = ServerConfig(model=MLP, store=tmp_path / "store", listen="127.0.0.1:0", rounds=1, min_devices=2,
                       personal_layers=("output",), enroll_token=TOKEN, **server_tls())
    running = app.start(cfg)
    yield running
    running.stop(0)


@pytest.mark.slow
def test_wrong_or_missing_enrollment_token_exits_2_naming_it(server, data, tmp_path) -> None:
    base = ["fedpers.client", "run", "--server", server.address, "--data", str(data), *client_tls_args()]
    missing = run(*base, "--state", str(tmp_path / "a"))
    assert missing.returncode == 2 and "Enroll refused" in missing.stderr and "enrollment token" in missing.stderr
    wrong = run(*base, "--state", str(tmp_path / "b"), env={"FEDPERS_ENROLL_TOKEN": "not-the-token"})
    assert wrong.returncode == 2 and "check the enrollment token" in wrong.stderr
    on_argv = run(*base, "--state", str(tmp_path / "c"), "--enroll-token", TOKEN)
    assert on_argv.returncode == 2 and "readable by every local user" in on_argv.stderr


@pytest.mark.slow
def test_data_that_does_not_fit_the_model_is_refused_at_join(server, tmp_path) -> None:
    """min-devices 2 and one device: no round ever opens, so the refusal can only come from the join."""
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((20, 10), np.float32), y=np.zeros(20, np.int64))
    proc = run("fedpers.client", "run", "--server", server.address, "--data", str(bad), "--state",
               str(tmp_path / "s"), *client_tls_args(), env={"FEDPERS_ENROLL_TOKEN": TOKEN}, timeout=60)
    assert proc.returncode == 2 and "examples have shape (10,), the model's input is (1, 1, 784)" in proc.stderr
    assert server.coordinator.state.count_rounds("open") == 0
