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


@pytest.mark.parametrize("extra", [[], ["--scenario", "label_skew"]])
def test_strong_label_skew_on_many_devices_gets_every_device_the_minimum(tmp_path, capsys, extra):
    """alpha <= 0.1 with 20+ devices is split (short devices topped up), not refused; the least number
    of examples per device is a flag, and an impossible one is refused naming the numbers."""
    out = tmp_path / "p"
    args = ["partition", "--devices", "40", "--alpha", "0.05", "--out", str(out), "--min-examples", "30", *extra]
    assert sim.main(args) == 0, capsys.readouterr().err
    sizes, labels = [], []
    for i in range(40):
        d = np.load(out / f"device-{i}.npz")
        sizes.append(d["y"].size + (0 if extra else d["y_test"].size))  # a scenario's test split is a shared pool
        labels.append(np.unique(d["y"]).size)
    assert min(sizes) >= 30
    assert np.median(labels) < 10  # the skew of the draw stays: most devices miss some classes
    code = sim.main(["partition", "--devices", "40", "--alpha", "0.05", "--out", str(tmp_path / "q"),
                     "--min-examples", "100", *extra])
    assert code == 2 and "40 devices 100 each" in capsys.readouterr().err


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


def test_the_digits_fit_any_shipped_model_or_are_refused_by_name():
    from fedpers import models
    from fedpers.client.partition import FitError, fit_to_input
    from fedpers.nn import load_ini

    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    for name in ("digits_cnn", "lenet5", "mlp", "vgg_small", "vgg_small_frozen"):
        shape = load_ini(models.path(name)).layers[0].input_shape
        out = fit_to_input(x, shape)
        assert out.shape == (3, *shape) and out.dtype == np.float32
        assert out.min() == x.min() and out.max() == x.max()  # nearest neighbour: no new values
    assert np.array_equal(fit_to_input(x, (1, 1, 64)).reshape(3, 8, 8), x[:, 0])
    big = fit_to_input(x, (3, 16, 24))
    assert np.array_equal(big[:, 2, ::2, ::3], x[:, 0]) and np.array_equal(big[:, 0], big[:, 1])
    for shape, match in [((1, 4, 4), "smaller than the 8x8 digits"), ((1, 1, 50), "not 50"),
                         ((1, 1, 49), "not 49"), ((8, 8), "not C:H:W")]:
        with pytest.raises(FitError, match=match):
            fit_to_input(x, shape)


def test_data_for_a_scenario_a_model_and_your_own_directory(tmp_path, capsys):
    from fedpers import models
    from fedpers.client.data import DataError, load_data

    cfg = sim.SimConfig(devices=6, scenario="concept_shift", model=models.path("lenet5.ini"), clusters=2)
    paths = sim.write_data(cfg, 3, tmp_path / "a")
    d = load_data(paths[0])
    assert len(paths) == 6 and d.input_shape == (1, 28, 28) and d.w_test is not None
    assert abs(d.w_test.sum() - 1) < 1e-9 and d.y_test.size > 100  # the test pool through this device's eyes
    # your own files: any input shape the model takes; the count and the shapes are checked up front
    own = tmp_path / "own"
    own.mkdir()
    for i in range(3):
        np.savez(own / f"device-{i}.npz", x=np.random.rand(12, 1, 1, 784).astype(np.float32),
                 y=np.arange(12) % 10)
    mlp = models.path("mlp.ini")
    assert len(sim.write_data(sim.SimConfig(devices=3, data_dir=own, model=mlp), 0, tmp_path / "b")) == 3
    ns = sim.build_parser().parse_args(["--data-dir", str(own), "--model", str(mlp)])
    assert sim.config_from_args(ns).devices == 3  # --devices defaults to the files
    with pytest.raises(ValueError, match="holds 3 device-"):
        sim.SimConfig(devices=4, data_dir=own, model=mlp)
    with pytest.raises(DataError, match=r"examples have shape \(1, 1, 784\), the model's input is \(1, 8, 8\)"):
        sim.write_data(sim.SimConfig(devices=3, data_dir=own), 0, tmp_path / "c")
    assert sim.main(["--data-dir", str(own), "--report-dir", str(tmp_path / "r")]) == 2
    assert "the model's input is (1, 8, 8)" in capsys.readouterr().err
    tiny = tmp_path / "tiny.ini"
    tiny.write_text("[Model]\ntype = NeuralNetwork\nloss = cross\n[in]\ntype = input\ninput_shape = 1:4:4\n"
                    "[out]\ntype = fully_connected\nunit = 10\nactivation = softmax\n")
    assert sim.main(["partition", "--devices", "2", "--out", str(tmp_path / "p"), "--model", str(tiny)]) == 2
    assert "smaller than the 8x8 digits" in capsys.readouterr().err


def test_personalization_flags_are_checked(tmp_path, capsys):
    cfg = sim.SimConfig(personalization="fedbn,ditto", personalization_params=("ft_epochs=2", "ditto:lam=0.5"),
                        seeds=(0, 1))
    assert cfg.methods == ("fedavg", "fedbn", "ditto") and cfg.seed_list == (0, 1)
    assert cfg.params_for("ditto") == "ft_epochs=2,lam=0.5" and cfg.params_for("fedbn") == "ft_epochs=2"
    argv = sim.server_argv(cfg, tmp_path / "p", tmp_path / "s", method="ditto")
    assert argv[argv.index("--personalization") + 1] == "ditto"
    assert argv[argv.index("--personalization-params") + 1] == "ft_epochs=2,lam=0.5"
    assert sim.SimConfig(personalization="all").methods[0] == "fedavg" and len(sim.SimConfig(
        personalization="all").methods) == 6
    for kw, match in [(dict(personalization="fedfoo"), "unknown personalization method"),
                      (dict(personalization="fedbn", personalization_params=("lam=0.5",)), "no hyperparameter 'lam'"),
                      (dict(personalization="fedbn", personalization_params=("ditto:lam=0.5",)), "not run"),
                      (dict(seeds=(0, 1)), "need --personalization"), (dict(scenario="nope"), "unknown scenario"),
                      (dict(clusters=3), "need --scenario"),
                      (dict(personalization="fedavg", seeds=(1, 1)), "distinct")]:
        with pytest.raises(ValueError, match=match):
            sim.SimConfig(**kw)
    assert sim.main(["--personalization", "fedbn", "--personalization-params", "lam=1",
                     "--report-dir", str(tmp_path / "r")]) == 2
    assert "fedavg has no hyperparameter 'lam'" in capsys.readouterr().err  # FedAvg runs too


@pytest.mark.slow
def test_a_method_comparison_writes_one_report_and_plot(tmp_path, capsys):
    from fedpers import models

    out = tmp_path / "run"
    code = sim.main(["--devices", "3", "--rounds", "2", "--local-epochs", "1", "--scenario", "feature_shift",
                     "--personalization", "fedbn", "--personalization-params", "ft_epochs=1", "--seeds", "0,1",
                     "--model", str(models.path("digits_cnn.ini")), "--min-devices", "3", "--report-dir", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("fedavg", 0), ("fedbn", 0), ("fedavg", 1),
                                                                   ("fedbn", 1)]
    for run in report["runs"]:
        assert run["ended"] == "finished" and [r["round"] for r in run["rounds"]] == [1, 2]
        assert run["fleet_default"] in ("global", "personal", "local_only")
        for d in run["devices"]:
            assert d["served"] in d["candidate_accuracy"] and 0 <= d["served_accuracy"] <= 1
            assert d["local_only_accuracy"] == d["candidate_accuracy"]["local_only"] and d["val_examples"] > 0
    labels = [r["label"] for r in report["comparison"]]
    assert labels == ["FedAvg", "FedAvg+FT", "FedBN", "FedAvg choice", "FedBN choice", "local-only"]
    assert all(r["seeds"] == 2 and r["sd"] >= 0 and 0 <= r["weighted_mean"] <= 100 for r in report["comparison"])
    assert len(report["per_device"]) == 6 and set(report["per_device"][0]["accuracy"]) == set(labels)
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "FedBN choice" in text and "mean ± sd over 2 seed(s)" in text


@pytest.mark.slow
def test_any_shipped_model_runs_on_the_digits(tmp_path):
    from fedpers import models

    report = sim.simulate(sim.SimConfig(devices=2, rounds=1, local_epochs=1, model=models.path("lenet5.ini"),
                                        report_dir=tmp_path / "r", quiet=True, min_devices=2))
    assert report.ended == "finished" and all(d.personalized_accuracy is not None for d in report.devices)


def test_status_poll_keeps_going_through_failures_then_names_the_broken_server():
    import grpc

    class Down(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "connection refused"

    class Client:
        calls = 0

        def status(self):
            self.calls += 1
            if self.calls == 2:
                return "status-2"
            raise Down()

    poll = sim.StatusPoll(Client())
    assert poll() is None and poll() == "status-2" and poll.failures == 0  # a success resets the count
    for _ in range(sim.STATUS_FAILURES_ALLOWED):
        assert poll() is None
    with pytest.raises(sim.SimError, match="stopped answering GetStatus: UNAVAILABLE: connection refused"):
        poll()
