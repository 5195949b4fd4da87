"""The Ray engine: its flags, a small federation on Ray actors over real gRPC, an actor killed mid-run.

The engine tests need Ray (`fedpers[ray]`, which `make test` installs) and skip with the reason without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fedpers import models
from fedpers.client import sim
from fedpers.client.memwatch import descendants
from fedpers.client.personal import PersonalStore
from fedpers.client.processes import free_port, wait_until
from fedpers.client.report import read_report

MODEL = models.path("digits_cnn_personal.ini")
NEEDS_RAY = "Ray is not installed: pip install 'fedpers[ray]' (make test installs it)"


# ----------------------------------------------------------------------------- flags


def test_engine_flags(tmp_path, capsys):
    assert sim.main(["--ray-actors", "2", "--report-dir", str(tmp_path)]) == 2
    assert "need --engine ray" in capsys.readouterr().err
    ns = sim.build_parser().parse_args(["--engine", "ray", "--ray-actors", "3", "--devices", "4"])
    from fedpers.client.engines import engine_from_args

    assert engine_from_args(ns).ray_actors == 3 and sim.config_from_args(ns).devices == 4
    with pytest.raises(SystemExit):
        sim.build_parser().parse_args(["--engine", "ray", "--ray-actors", "0"])


@pytest.mark.parametrize("flags, named", [
    (["--scenario", "label_skew"], "--scenario"),
    (["--min-examples", "10"], "--min-examples"),
    (["--personalization", "fedbn", "--model", str(models.path("digits_cnn.ini"))], "--personalization"),
    (["--seeds", "0,1", "--personalization", "fedrep", "--model", str(models.path("digits_cnn.ini"))],
     "--personalization, --seeds"),
])
def test_flags_the_ray_engine_cannot_honour_are_refused_before_anything_starts(flags, named, tmp_path, capsys):
    assert sim.main(["--engine", "ray", "--devices", "4", "--report-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert f"--engine ray does not support {named} yet" in err, err
    assert not (tmp_path / "work").exists() and not (tmp_path / "report.json").exists()


# ----------------------------------------------------------------------------- the engine on Ray


def _needs_ray() -> None:
    """Skip without Ray. Not importorskip: the engine imports ray itself, after setting the environment
    that keeps a local Ray on the loopback (ray reads it once, at import)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip(NEEDS_RAY)


def _ray_processes() -> list[int]:
    out = []
    for pid in descendants(os.getpid())[1:]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ray" in cmd.lower():
            out.append(pid)
    return out


@pytest.mark.slow
def test_ray_engine_runs_a_small_federation_over_real_grpc(tmp_path):
    _needs_ray()
    from fedpers.client.ray_engine import RayConfig, simulate_ray

    cfg = sim.SimConfig(devices=20, rounds=2, local_epochs=1, model=MODEL, report_dir=tmp_path / "r", quiet=True,
                        timeout=300)
    report = simulate_ray(cfg, RayConfig(actors=2))
    assert report.ended == "finished" and [r.round for r in report.rounds] == [1, 2]
    assert all(r.devices >= 19 for r in report.rounds)  # min-devices: all but one of the sample
    assert len(report.devices) == 20 and report.config["engine"] == "ray"
    assert report.summary.personalized_accuracy is not None and report.summary.local_only_accuracy is not None
    ids = set()
    for i, row in enumerate(report.devices):  # each device's own state directory holds its own state
        state = PersonalStore(tmp_path / "r" / "work" / "devices" / str(i)).load()
        assert state is not None and state.name == f"sim-device-{i}" and state.device_id == row.id
        assert (tmp_path / "r" / "work" / "devices" / str(i) / "device.secret").exists()
        assert state.local and row.rounds_trained == len(state.history) >= 1
        ids.add(state.device_id)
    assert len(ids) == 20
    engine = json.loads((tmp_path / "r" / "engine.json").read_text())
    assert engine["steps"]["done"] == 20 and not engine["lost"] and not engine["refusals"]
    assert engine["run_peak_pss_bytes"] > 0 and engine["server_peak_rss_bytes"] > 0
    assert {h["host"] for h in engine["hosts"]} == {"actor-0", "actor-1"}
    assert not _ray_processes()  # Ray shut down with the run
    assert "RAY_AUTH_TOKEN" not in os.environ  # the run's token went with it


@pytest.fixture
def ray_head():
    """An existing Ray cluster for --ray-address: `ray start --head --block` on the loopback and a free port,
    its files in a short temp dir; SIGTERM to the blocking process stops every process it started."""
    _needs_ray()
    port = free_port()
    temp = tempfile.mkdtemp(prefix="fr-", dir="/tmp")  # short: Ray's socket paths
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                             "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(f"ray head on 127.0.0.1:{port}", lambda: _listening(port), 60)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        head.wait(60)
        shutil.rmtree(temp, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_ray_engine_runs_on_an_existing_cluster_by_address(ray_head, tmp_path):
    # its own process, as a user runs it: this one has already run local Rays with token auth, and Ray keeps
    # the auth mode for the process, so its driver would refuse the unauthenticated cluster's calls
    # ("Missing authorization header") and every actor would die before it starts
    proc = subprocess.run([sys.executable, "-m", "fedpers.client.sim", "--engine", "ray", "--ray-address", ray_head,
                           "--devices", "6", "--rounds", "1", "--local-epochs", "1", "--model", str(MODEL),
                           "--report-dir", str(tmp_path), "--timeout", "300"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ended"] == "finished" and len(report["rounds"]) == 1
    engine = json.loads((tmp_path / "engine.json").read_text())
    assert engine["ray"] == ray_head and engine["steps"]["done"] == 6 and not engine["lost"]


def test_an_address_where_no_cluster_answers_fails_fast_with_the_reason(tmp_path, capsys):
    _needs_ray()
    port = free_port()  # nothing listens there
    rc = sim.main(["--engine", "ray", "--ray-address", f"127.0.0.1:{port}", "--devices", "4", "--rounds", "1",
                   "--report-dir", str(tmp_path)])
    assert rc == 1
    assert f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there" in capsys.readouterr().err


def _shape(value):
    """The structure of a JSON value: its keys, nested; a list by the union of its elements' shapes."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        merged: dict = {}
        for v in value:
            s = _shape(v)
            merged = {**merged, **s} if isinstance(s, dict) else {"": s}
        return [merged]
    return "leaf"


@pytest.mark.slow
def test_ray_engine_writes_the_process_engines_report_shape(tmp_path, capsys):
    """The same tiny federation through `fedpers-sim` with each engine: report.json has the same shape
    (the config names the engine and its Ray settings besides), and both draw the plot."""
    _needs_ray()
    common = ["--devices", "3", "--rounds", "1", "--local-epochs", "1", "--min-devices", "3", "--seed", "5",
              "--model", str(Path(__file__).parent / "data" / "digits_mlp_personal.ini")]
    runs = {}
    for engine in ("process", "ray"):
        out = tmp_path / engine
        assert sim.main(["--engine", engine, "--report-dir", str(out), *common]) == 0, capsys.readouterr().out
        runs[engine] = json.loads((out / "report.json").read_text())
        assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc, ray_ = runs["process"], runs["ray"]
    assert set(ray_) == set(proc)
    for key in set(proc) - {"config", "notes"}:
        assert _shape(ray_[key]) == _shape(proc[key]), key
    assert set(ray_["config"]) - set(proc["config"]) == {"engine", "ray"} and set(proc["config"]) <= set(ray_["config"])
    assert ray_["config"]["engine"] == "ray" and ray_["config"]["ray"]["actors"] == 2
    assert set(proc["notes"]) <= set(ray_["notes"])
    assert len(ray_["devices"]) == len(proc["devices"]) == 3 and len(ray_["rounds"]) == len(proc["rounds"]) == 1
    assert not (tmp_path / "process" / "engine.json").exists() and (tmp_path / "ray" / "engine.json").exists()


@pytest.mark.slow
def test_devices_of_a_killed_actor_continue_on_another(tmp_path):
    _needs_ray()
    from fedpers.client.ray_engine import RayConfig, simulate_ray

    cfg = sim.SimConfig(devices=8, rounds=3, local_epochs=1, model=MODEL, report_dir=tmp_path / "r", quiet=True,
                        timeout=300, min_devices=6)
    devices_dir = tmp_path / "r" / "work" / "devices"
    killed: list[int] = []
    trained_at_kill: dict[int, int] = {}  # device -> rounds it had trained (its report.json) when the actor died

    def kill_an_actor_after_round_one() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            reports = {int(p.name): read_report(p / "report.json") for p in devices_dir.glob("*")
                       if (p / "report.json").exists()}
            if sum(1 for r in reports.values() if r and r.rounds_trained >= 1) >= 6:
                trained_at_kill.update({i: r.rounds_trained for i, r in reports.items() if r})
                hosts = [pid for pid in _ray_processes()
                         if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::DeviceHost")]
                if hosts:
                    os.kill(hosts[0], signal.SIGKILL)
                    killed.append(hosts[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_an_actor_after_round_one, daemon=True)
    killer.start()
    report = simulate_ray(cfg, RayConfig(actors=2))
    killer.join()
    assert killed, "no actor was killed"
    engine = json.loads((tmp_path / "r" / "engine.json").read_text())
    assert engine["moves"] >= 1 and any(h.get("died") for h in engine["hosts"])
    assert report.ended == "finished" and len(report.rounds) == 3
    # A device of the dead actor (device i starts on actor i % 2) trained there before the kill and on the
    # live actor after it. From the devices' own histories: the driver's devices_trained_on_several_actors
    # misses trainings whose batch was still in flight when the actor died.
    dead = [int(h["host"].rsplit("-", 1)[1]) for h in engine["hosts"] if h.get("died")]
    moved = [i for i in range(8) if i % 2 == dead[0]]
    assert any(0 < trained_at_kill.get(i, 0) < len(PersonalStore(devices_dir / str(i)).load().history)
               for i in moved), (trained_at_kill, moved)
    for i in range(8):
        state = PersonalStore(devices_dir / str(i)).load()
        assert state is not None and state.name == f"sim-device-{i}"
        rounds = [r.round_id for r in state.history]
        assert rounds == sorted(set(rounds))  # one history, continued: no round twice, none forgotten
    assert not _ray_processes()
