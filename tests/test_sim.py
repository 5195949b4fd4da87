"""fedpers-sim: the one-command simulation and its partition / local-only subcommands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedpers.client import sim

MODEL = Path(__file__).parent / "data" / "digits_mlp_personal.ini"


@pytest.mark.slow
def test_simulation_writes_report_plot_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    code = sim.main(["--devices", "3", "--rounds", "2", "--local-epochs", "1", "--model", str(MODEL),
                     "--report-dir", str(out), "--codec", "int8+zstd", "--seed", "3", "--min-devices", "3"])
    text = capsys.readouterr().out
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert {"round", "version", "devices", "global_accuracy"} <= set(r) and r["devices"] == 3
        assert 0 <= r["global_accuracy"] <= 1
    assert len(report["devices"]) == 3
    ids = set()
    for d in report["devices"]:
        assert {"id", "global_accuracy", "personalized_accuracy", "local_only_accuracy", "bytes_up", "bytes_down",
                "peak_rss_bytes"} <= set(d)
        for key in ("global_accuracy", "personalized_accuracy", "local_only_accuracy"):
            assert 0 <= d[key] <= 1, (key, d)
        assert d["bytes_up"] > 0 and d["bytes_down"] > 0 and d["peak_rss_bytes"] > 0 and d["rounds_trained"] == 2
        assert d["local_only_epochs"] == 3  # 2 rounds x 1 epoch + the final personalization
        ids.add(d["id"])
    assert len(ids) == 3
    assert report["config"]["codec"] == "int8+zstd"
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "round   2/2" in text and "local-only%" in text and "mean" in text
    assert not (out / "work" / "data").exists()  # device data is removed unless --keep-work


def test_partition_subcommand(tmp_path, capsys):
    assert sim.main(["partition", "--devices", "4", "--out", str(tmp_path), "--seed", "5", "--alpha", "0.3"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / f"device-{i}.npz") for i in range(4)]
    sizes = [np.load(tmp_path / f"device-{i}.npz")["y"].size for i in range(4)]
    assert min(sizes) > 0
    assert sim.main(["partition", "--devices", "1000", "--out", str(tmp_path / "x")]) == 2


def test_local_only_subcommand(tmp_path):
    sim.main(["partition", "--devices", "2", "--out", str(tmp_path)])
    out = tmp_path / "lo.json"
    assert sim.main(["local-only", "--data", str(tmp_path / "device-0.npz"), "--model", str(MODEL),
                     "--epochs", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["epochs"] == 3 and 0 <= res["accuracy"] <= 1


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own check: exit 2 with the usage
        sim.main(["--devices", "0"])
    assert exit_.value.code == 2 and "argument --devices: must be a positive integer, got 0" in capsys.readouterr().err
    assert sim.main(["--codec", "nope", "--report-dir", str(tmp_path / "r")]) == 2
    assert sim.main(["--model", str(tmp_path / "missing.ini"), "--report-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "unknown codec" in err and "does not exist" in err


@pytest.mark.slow
def test_ctrl_c_writes_the_report_of_what_finished(tmp_path):
    """Ctrl-C reaches the simulator only (its children run in their own sessions): it stops them,
    writes report.json with the rounds that finished, and exits 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fedpers.client.sim", "--devices", "3", "--rounds", "40", "--local-epochs", "1",
            "--model", str(MODEL), "--report-dir", str(out), "--seed", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    deadline = time.monotonic() + 180
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("round   2/40"):
                break
            assert time.monotonic() < deadline, "".join(seen)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(seen) + rest
    assert proc.returncode == 130, text
    assert "interrupted; writing the report of what finished" in text
    report = json.loads((out / "report.json").read_text())
    assert report["ended"] == "interrupted" and len(report["rounds"]) >= 2, report["rounds"]
    assert len(report["devices"]) == 3 and all(d["rounds_trained"] >= 1 for d in report["devices"])


@pytest.mark.slow
def test_the_defaults_survive_a_lost_device(tmp_path):
    """Default settings (min-devices = all but one): a device killed for good after the first round
    does not stall the run; the simulator goes on without it and the federation finishes."""
    import os
    import signal
    import threading
    import time

    out = tmp_path / "run"
    cfg = sim.SimConfig(devices=3, rounds=4, local_epochs=1, model=MODEL, report_dir=out, round_timeout=15,
                        quiet=True, seed=2)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(report=sim.simulate(cfg)), daemon=True)
    runner.start()
    victim_report = out / "work" / "devices" / "2" / "report.json"
    deadline = time.monotonic() + 120
    while not (victim_report.exists() and json.loads(victim_report.read_text())["rounds_trained"] >= 1):
        assert time.monotonic() < deadline and runner.is_alive()
        time.sleep(0.1)
    # this run's device 2 only: other simulators on the machine have their own sim-device-2
    victims = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
               and b"sim-device-2" in (cmd := _cmdline(p)) and str(out).encode() in cmd]
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    runner.join(240)
    assert not runner.is_alive() and "report" in result, "the run did not finish without the lost device"
    report = result["report"]
    assert report.ended == "finished" and [r.round for r in report.rounds][-1] >= 4
    assert report.rounds[-1].version == 4
    lost = report.devices[2]
    # (a survivor may have missed round 1 if it started after the others had opened it)
    assert lost.rounds_trained < 4 and all(d.rounds_trained >= 3 for d in report.devices[:2])


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
def test_dp_epsilon_is_reported_per_round_and_per_device(tmp_path):
    from fedpers.privacy import epsilon

    report = sim.simulate(sim.SimConfig(devices=3, rounds=2, local_epochs=1, model=MODEL, report_dir=tmp_path / "r",
                                        quiet=True, min_devices=3, codec="int8", dp_clip=0.5, dp_noise=1.5, seed=4))
    assert [r.dp_epsilon for r in report.rounds] == pytest.approx([epsilon(1.5, 1, 1e-5), epsilon(1.5, 2, 1e-5)])
    assert report.summary.dp_epsilon == pytest.approx(epsilon(1.5, 2, 1e-5))
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["rounds"][-1]["dp_epsilon"] == pytest.approx(epsilon(1.5, 2, 1e-5))
    from fedpers.client.report import read_report

    for i in range(3):
        dev = read_report(tmp_path / "r" / "work" / "devices" / str(i) / "report.json")
        assert dev.dp_epsilon == pytest.approx(epsilon(1.5, dev.rounds_trained, 1e-5)) and dev.dp_delta == 1e-5
        assert all(r.dp_noise_multiplier == 1.5 for r in dev.rounds)


def test_no_secret_in_any_command_line(tmp_path):
    """Any local user reads /proc/PID/cmdline: the simulator hands tokens over in the environment."""
    cfg = sim.SimConfig(devices=2, rounds=1, model=MODEL)
    secrets = sim.SimSecrets()
    tls = sim.SimTls.make(cfg, tmp_path / "tls")
    argv = sim.server_argv(cfg, tmp_path / "port", tmp_path / "store", tls)
    argv += sim.device_argv(cfg, "127.0.0.1:1", tmp_path / "d.npz", tmp_path / "s", "sim-device-0", tls)
    text = " ".join(argv)
    assert secrets.enroll_token not in text and secrets.admin_token not in text and "--enroll-token" not in text
    assert "--tls-cert" in text and "--tls-ca" in text and "--insecure" not in text
    assert secrets.server_env()["FEDPERS_ENROLL_TOKEN"] == secrets.device_env()["FEDPERS_ENROLL_TOKEN"]
    assert secrets.enroll_token not in repr(secrets)
    plain = sim.SimTls.make(sim.SimConfig(devices=2, rounds=1, model=MODEL, insecure=True), tmp_path / "none")
    assert plain.server_args() == ["--insecure"] and plain.device_args() == ["--insecure"]
