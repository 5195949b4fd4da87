"""fedpers-server as a process: serve from a real INI, health, status, SIGTERM, restart, TOML config."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fedpers import codec, wire
from fedpers.server.config import ConfigError, load_config

from tests.server_helpers import Device, client_tls_args, server_tls_args

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "common" / "models" / "mlp.ini"


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedpers.server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


class ServerProcess:
    def __init__(self, store: Path, *extra: str, enroll_token: str = "") -> None:
        """fedpers-server on a free port with TLS; the enrollment token travels in its environment."""
        self.port_file = store / "port"
        self.port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedpers.server", "--model", str(MODEL), "--store", str(store),
             "--listen", "127.0.0.1:0", "--port-file", str(self.port_file), "--personal-layers", "output",
             *server_tls_args(), *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, FEDPERS_ENROLL_TOKEN=enroll_token),
        )
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"server did not start:\n{self.proc.communicate()[0]}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(self.port_file.read_text())}"

    def terminate(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _fp32_update(task: wire.Task, shapes: dict[str, tuple[int, ...]], seed: int):
    rng = np.random.default_rng(seed)
    tensors = []
    for name in task.config.shared_tensors:
        payload, _ = codec.encode("fp32", (0.01 * rng.standard_normal(shapes[name])).astype(np.float32))
        tensors.append(wire.encoded_to_wire(name, shapes[name], "fp32", payload))
    blob = wire.tensorset_to_blob(tensors)
    hdr = wire.UpdateHeader(task.round_id, task.base_version, 20, len(blob), wire.sha256(blob), "fp32", {"loss": 1.0})
    return wire.upload_messages(hdr, blob)


@pytest.mark.slow
def test_serve_health_status_sigterm_and_restart(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)  # as `mkdir store` leaves it: the server makes it 0700
    server = ServerProcess(tmp_path, "--rounds", "2", "--min-devices", "1", enroll_token="t0k")
    admin = ("--admin-token-file", str(tmp_path / "admin.token"))
    try:
        health = _cli("health", "--address", server.address, *client_tls_args())
        assert health.returncode == 0 and "SERVING" in health.stdout
        dev = Device(server.address, "d1", enroll="t0k")
        task = dev.task()
        assert task.kind == wire.TaskKind.TRAIN and task.config.personal_layers == ("output",)
        assert task.config.shared_tensors == ("fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight")
        assert task.config.local_epochs == 10 and task.config.batch_size == 64  # from the INI
        assert "[fc1]" in task.model_ini
        base = dev.download(0)
        assert "output.weight" not in base  # personal: never served
        shapes = {k: v.shape for k, v in base.items()}
        assert dev.upload(_fp32_update(task, shapes, 1)).accepted
        status = json.loads(_cli("status", "--address", server.address, "--json", *admin, *client_tls_args()).stdout)
        assert status["version"] == 1 and status["rounds_completed"] == 1 and status["rounds_target"] == 2
        table = _cli("status", "--address", server.address, *admin, *client_tls_args())
        assert table.returncode == 0 and "rounds 1/2" in table.stdout
        assert "train = on their own training data" in table.stdout and "held-out global" in table.stdout
        row = next(line for line in table.stdout.splitlines() if line.split()[:2] == ["1", "closed"])
        assert row.split("|")[1].split() == ["1", "-"]  # the update reported loss 1.0 and no train accuracy
        no_admin = _cli("status", "--address", server.address, *client_tls_args())
        assert no_admin.returncode == 2 and "admin token" in no_admin.stderr
        dev.task()  # round 2 opens; SIGTERM abandons it
        dev.close()
        credentials = dev.credentials
        code, out = server.terminate()
        assert code == 0, out
        assert "round 2 left open" in out and "stopped at version 1" in out
    finally:
        server.kill()
    stored = sorted(os.listdir(tmp_path / "models"))
    assert stored == ["v000000000000.fpst", "v000000000001.fpst"]
    # the store is the server's alone: it names devices, holds credential hashes and the admin token
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path, tmp_path / "models")}
    modes |= {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "state.sqlite", tmp_path / "admin.token",
                                                               *(tmp_path / "models").iterdir()]}
    assert set(modes.values()) <= {0o700, 0o600} and modes["state.sqlite"] == 0o600, modes
    # what the stopped server left, read offline (read only: the database file is not touched)
    db_before = (tmp_path / "state.sqlite").read_bytes()
    offline = wire.status_from_json(_cli("status", "--store", str(tmp_path), "--json").stdout)
    assert offline.version == 1 and offline.rounds_completed == 1 and offline.devices_joined == 1
    assert [(r.round_id, r.state) for r in offline.rounds] == [(1, "closed"), (2, "open")]
    assert (tmp_path / "state.sqlite").read_bytes() == db_before
    missing = _cli("status", "--store", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "not a fedpers-server store" in missing.stderr
    out = tmp_path / "report"
    rep = _cli("report", "--store", str(tmp_path), "--json", str(out / "report.json"), "--png", str(out / "acc.png"))
    assert rep.returncode == 0, rep.stderr
    doc = json.loads((out / "report.json").read_text())
    assert [(r["round"], r["version"], r["devices"], r["loss"]) for r in doc["rounds"]] == [(1, 1, 1, 1.0)]
    assert (out / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in stored:
        assert b"output" not in (tmp_path / "models" / name).read_bytes()

    server = ServerProcess(tmp_path, "--rounds", "2", "--min-devices", "1")  # enrollment closed now
    try:
        dev = Device(server.address, "d1", credentials=credentials)  # an enrolled device needs no token
        task = dev.task()
        assert task.base_version == 1
        assert dev.upload(_fp32_update(task, shapes, 2)).accepted
        assert dev.task().kind == wire.TaskKind.DONE
        dev.close()
        assert server.terminate()[0] == 0
    finally:
        server.kill()
    # nothing listens now
    assert _cli("health", "--address", server.address, *client_tls_args(), timeout=30).returncode == 1


def test_bad_settings_exit_with_a_message(tmp_path: Path) -> None:
    r = _cli("--store", str(tmp_path))
    assert r.returncode == 2 and "model: required" in r.stderr
    r = _cli("--model", str(MODEL), "--store", str(tmp_path), "--fraction", "2")
    assert r.returncode == 2 and "fraction" in r.stderr
    r = _cli("--model", str(MODEL), "--store", str(tmp_path), "--personal-layers", "nope", "--listen", "127.0.0.1:0",
             "--insecure")
    assert r.returncode == 1 and "not layers with weights" in r.stderr


def test_toml_config_and_flag_override(tmp_path: Path) -> None:
    (tmp_path / "server.toml").write_text(
        '[server]\nmodel = "m.ini"\nstore = "/abs/store"\nrounds = 7\nmin-devices = 3\npersonal_layers = ["out"]\n'
        'strategy = "fedadam"\ntls-cert = "certs/server.pem"\ntls_key = "/etc/fedpers/server.key"\n')
    cfg = load_config({"rounds": 4, "fraction": None}, tmp_path / "server.toml")
    assert cfg.tls_cert == tmp_path / "certs" / "server.pem" and cfg.tls_key == Path("/etc/fedpers/server.key")
    assert cfg.rounds == 4 and cfg.min_devices == 3 and cfg.strategy == "fedadam"
    assert cfg.model == tmp_path / "m.ini" and cfg.store == Path("/abs/store")
    assert cfg.personal_layers == ("out",) and cfg.fraction == 1.0
    (tmp_path / "bad.toml").write_text('model = "m"\nstore = "s"\nround = 3\n')
    with pytest.raises(ConfigError, match="unknown key 'round'"):
        load_config({}, tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="strategy"):
        load_config({"model": "m", "store": "s", "strategy": "sgd"})
    (tmp_path / "typed.toml").write_text('model = "m"\nstore = "s"\nrounds = "three"\n')
    with pytest.raises(ConfigError, match="rounds: expected an integer, got 'three'"):
        load_config({}, tmp_path / "typed.toml")
    for key, value, kind in (("fraction", "half", "a number"), ("min_devices", True, "an integer"),
                             ("personal_layers", 3, "a list"), ("codec", 8, "a string"), ("store", 1, "a path"),
                             ("insecure", "yes", "true or false")):
        with pytest.raises(ConfigError, match=f"{key}: expected {kind}"):
            load_config({"model": "m", "store": "s", "insecure": True, key: value})
    assert load_config({"model": "m", "store": "s", "insecure": True, "round_timeout": 5}).round_timeout == 5.0


def test_bad_toml_value_exits_2_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(f'model = "{MODEL}"\nstore = "st"\nrounds = "three"\n')
    r = _cli("--config", str(tmp_path / "s.toml"))
    assert r.returncode == 2 and "rounds: expected an integer, got 'three'" in r.stderr
    assert "Traceback" not in r.stderr


def test_json_log_file(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "server.jsonl"
    server = ServerProcess(tmp_path, "--log-file", str(log_file), "--log-format", "json")
    try:
        assert server.terminate()[0] == 0
    finally:
        server.kill()
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"].startswith("fedpers-server listening on 127.0.0.1:") for r in records)
    assert any(r["message"] == "stopped at version 0" for r in records)


@pytest.mark.slow
def test_server_exits_once_the_federation_is_done_and_quiet(tmp_path: Path) -> None:
    for keep in (False, True):
        store = tmp_path / ("keep" if keep else "exit")
        store.mkdir()
        extra = ["--rounds", "1", "--min-devices", "1", "--linger", "1"] + (["--keep-serving"] if keep else [])
        server = ServerProcess(store, *extra, enroll_token="t0k")
        try:
            dev = Device(server.address, "d1", enroll="t0k")
            task = dev.task()
            shapes = {k: v.shape for k, v in dev.download(0).items()}
            assert dev.upload(_fp32_update(task, shapes, 1)).accepted
            assert dev.task().kind == wire.TaskKind.DONE
            dev.download(1)  # what a device does after DONE: fetch the final model
            dev.close()
            if keep:
                time.sleep(3)
                assert server.proc.poll() is None, "--keep-serving must stay up"
                assert server.terminate()[0] == 0
            else:
                out, _ = server.proc.communicate(timeout=30)
                assert server.proc.returncode == 0, out
                assert "federation finished and no device called for 1s: exiting" in out
        finally:
            server.kill()
