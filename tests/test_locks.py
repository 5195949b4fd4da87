"""One process per --state / --store directory: the second user is refused with a message naming the first."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from fedpers import models
from fedpers.client.agent import Agent, AgentConfig
from fedpers.locks import DirectoryBusy, DirLock
from fedpers.tls import TlsConfig


def test_second_lock_is_refused_until_the_first_is_released(tmp_path) -> None:
    first = DirLock(tmp_path, "device")
    with pytest.raises(DirectoryBusy, match=rf"in use by device \(pid {os.getpid()}\); give each device its own"):
        DirLock(tmp_path, "device")
    first.release()
    DirLock(tmp_path, "device").release()
    assert (tmp_path / ".lock").stat().st_mode & 0o777 == 0o600


def test_a_dead_holder_leaves_no_stale_lock(tmp_path) -> None:
    code = f"from fedpers.locks import DirLock; DirLock({str(tmp_path)!r}, 'x'); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    DirLock(tmp_path, "device").release()  # the kernel dropped the dead process's lock


def test_two_devices_on_one_state_dir(tmp_path) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.int64))
    cfg = AgentConfig(server="127.0.0.1:1", data=data, state=tmp_path / "state", tls=TlsConfig(insecure=True))
    first = Agent(cfg)
    try:
        with pytest.raises(DirectoryBusy, match="state is in use by device"):
            Agent(cfg)
    finally:
        first.close()
    Agent(cfg).close()  # free again once the first device closed


def test_second_server_on_one_store_exits_before_writing(tmp_path) -> None:
    from fedpers.server import app
    from fedpers.server.config import ServerConfig

    cfg = ServerConfig(model=models.path("mlp.ini"), store=tmp_path, listen="127.0.0.1:0", insecure=True)
    running = app.start(cfg)
    try:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        proc = subprocess.run([sys.executable, "-m", "fedpers.server", "--model", str(models.path("mlp.ini")),
                               "--store", str(tmp_path), "--listen", "127.0.0.1:0", "--insecure"], capture_output=True,
                              text=True,
                              timeout=60)
        assert proc.returncode == 2 and "is in use by fedpers-server (pid" in proc.stderr, proc.stderr
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
    finally:
        running.stop(0)


def test_a_server_on_a_busy_port_writes_nothing(tmp_path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "fedpers.server", "--model", str(models.path("mlp.ini")),
                               "--store", str(tmp_path / "store"), "--listen", f"127.0.0.1:{port}", "--insecure"],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"--listen 127.0.0.1:{port}: Address already in use" in proc.stderr, proc.stderr
    assert not (tmp_path / "store" / "models").exists() and not (tmp_path / "store" / "state.sqlite").exists()
