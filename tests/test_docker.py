"""The docker-compose fleet for real (docker/fleet.py): image, rounds, isolation, restart, memory limits.

One module-scoped run builds the image, brings up docker/docker-compose.yml under a unique project
name, restarts the server mid-run, waits for 3 rounds, runs device-small once more in naive and in
swap mode under its mem_limit, prints the per-device table and tears everything down. Every test
below asserts on what that run observed. Skipped, with the reason, where no Docker daemon answers.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "docker"))  # the fleet modules sit next to docker/fleet.py, not in the package

import fleet  # noqa: E402
import fleet_memory  # noqa: E402
from fleet_docker import FleetError, docker_available  # noqa: E402
from fleet_memory import CGROUP, PeakSampler, SizeError, parse_size  # noqa: E402
from fleet_report import replica_summary, summary  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROUNDS = 3


# -- the sampler's parsing, without Docker


def test_docker_stats_sizes_parse_and_anything_else_is_an_error() -> None:
    assert parse_size("190.5MiB") == int(190.5 * 2**20)
    assert parse_size("1.2GiB") == int(1.2 * 2**30)
    assert parse_size("512kB") == 512_000
    assert parse_size(" 0B ") == 0
    for junk in ("", "--", "12 parsecs", "1.2.3MiB", "MiB"):
        with pytest.raises(SizeError):
            parse_size(junk)


def test_an_odd_docker_stats_line_is_reported_not_counted(monkeypatch, caplog) -> None:
    printed = "abc123 100MiB / 288MiB\ndef456 -- / --\n"
    monkeypatch.setattr(fleet_memory, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 0, printed, ""))
    with caplog.at_level(logging.WARNING, logger="fedpers.fleet"):
        assert fleet_memory.docker_stats(["abc123ffff", "def456ffff"]) == {"abc123": 100 * 2**20}
    assert "def456 -- / --" in caplog.text


def test_sampling_problems_are_kept_and_bugs_raise_from_stop() -> None:
    def docker_gone() -> dict[str, str]:
        raise FleetError("docker ps: exit 1")

    expected = PeakSampler(docker_gone, interval=0.01, relist=0.0)
    expected.start()
    expected.join(0.2)
    assert expected.stop() == {} and expected.problems == ["FleetError: docker ps: exit 1"]

    buggy = PeakSampler(lambda: {"abc": 1 // 0}, interval=0.01)  # a bug, not a sampling problem
    buggy.start()
    buggy.join(5)
    with pytest.raises(ZeroDivisionError):
        buggy.stop()


# -- the fleet for real


def _fleet(request: pytest.FixtureRequest, start: Callable[..., Any], describe: Callable[[Any], str]) -> Any:
    """Run one fleet scenario for a module's tests (skipped without Docker) and print its summary."""
    reason = docker_available()
    if reason:
        pytest.skip(f"Docker fleet test needs a Docker daemon and docker-compose: {reason}")
    result = start(rounds=ROUNDS, timeout=600)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + describe(result), flush=True)
    return result


@pytest.fixture(scope="module")
def run(request: pytest.FixtureRequest):
    return _fleet(request, fleet.run_fleet, summary)


def test_image_roles_user_and_layers(run) -> None:
    c = run.image_checks
    assert c.help_exit == {"fedpers-server": 0, "fedpers-client": 0}
    assert c.uid != 0, "the image must run as a non-root user"
    assert c.compilers == [], f"compilers left in the image: {c.compilers}"
    assert c.pip_caches == [], f"pip caches left in the image: {c.pip_caches}"
    assert c.numba_cache_writable
    assert c.healthcheck[:3] == ["CMD", "fedpers-server", "health"]
    assert c.deps_cached_after_code_change, "a code change reinstalled the dependencies"
    assert run.image_size > 0


def test_base_version_advanced_once_per_round(run) -> None:
    status = run.status
    assert status.finished and status.rounds_completed == ROUNDS
    assert status.version == ROUNDS, f"version {status.version} after {ROUNDS} rounds"
    assert run.versions_seen == sorted(run.versions_seen) and run.versions_seen[-1] == ROUNDS
    assert [r.version for r in status.rounds if r.state == "closed"] == list(range(1, ROUNDS + 1))


def test_every_device_contributed(run) -> None:
    assert len(run.devices) >= 4 and "device-small" in run.devices
    for device in run.devices:
        report = run.reports[device]
        assert report is not None, f"{device} printed no --json report"
        assert report.rounds_trained >= 1, f"{device} never contributed: {report}"
        assert report.bytes_up > 0
        assert report.reason == "done" and report.name == device


def test_no_restart_no_oom_clean_exits(run) -> None:
    for service, info in run.containers.items():
        assert info.restart_count == 0, f"{service} restarted"
        assert not info.oom_killed, f"{service} was OOM-killed"
        assert info.exit_code == 0, f"{service} exited with {info.exit_code}"
    assert run.server_final_exit == 0, "the server did not exit 0 on SIGTERM"
    assert "Traceback" not in run.server_log


def test_each_device_sees_only_its_own_data(run) -> None:
    for device in run.devices:
        mounts = {dest: (name, rw) for name, dest, rw in run.containers[device].mounts}
        assert set(mounts) == {"/var/lib/fedpers/data", "/var/lib/fedpers/state", "/var/lib/fedpers/bootstrap"}, mounts
        # the CA certificate and enrollment token every device shares, read-only; never the server's key
        assert mounts["/var/lib/fedpers/bootstrap"] == (f"{run.project}_fleet-bootstrap", False)
        data_volume, data_rw = mounts["/var/lib/fedpers/data"]
        state_volume, state_rw = mounts["/var/lib/fedpers/state"]
        assert data_volume == f"{run.project}_{device}-data" and not data_rw
        assert state_volume == f"{run.project}_{device}-state" and state_rw
        assert run.containers[device].user == "fedpers"
    server = run.containers["server"]
    assert server.ports and all(ip == "127.0.0.1" for ip, _ in server.ports), server.ports
    assert {dest: rw for _, dest, rw in server.mounts} == {
        "/var/lib/fedpers/store": True, "/var/lib/fedpers/tls": False, "/var/lib/fedpers/bootstrap": False}


def test_server_restart_continues_from_its_last_version(run) -> None:
    r = run.restart
    assert r.stop_exit_code == 0, "SIGTERM must stop the server cleanly"
    assert r.stopped_at_version >= max(1, r.version_before_stop)
    assert r.version_after_start == r.stopped_at_version, "the restarted server did not continue from its store"
    assert len(r.devices_running_while_down) == len(run.devices), "devices must wait for the server, not exit"


def test_device_sigterm_is_clean_and_it_rejoins_as_itself(run) -> None:
    r = run.restart
    assert r.device_stop_exit_code == 0, f"{r.device} did not exit 0 on SIGTERM"
    stopped, final = r.device_stop_report, run.reports[r.device]
    assert stopped is not None and final is not None, f"{r.device} printed no --json report"
    assert stopped.reason == "stopped"
    assert final.id == stopped.id and final.name == r.device
    assert final.rounds_trained >= stopped.rounds_trained


def test_device_small_naive_is_oom_killed_where_swap_fits(run) -> None:
    m = run.memory
    if not m.enforced:
        pytest.skip(f"memory proof: {m.reason}")
    assert m.plan["naive"] > 2 * m.plan["swap"]
    assert m.naive.oom_killed and m.naive.exit_code == 137, f"naive under {m.mem_limit} bytes: {m.naive}"
    assert m.swap.exit_code == 0 and not m.swap.oom_killed, f"swap under {m.mem_limit} bytes: {m.swap}"
    small = run.containers["device-small"]
    assert small.mem_limit == m.mem_limit and small.exit_code == 0 and not small.oom_killed
    # Its 96MiB budget picks the fastest plan predicted to fit from the RSS this process already holds,
    # which differs between hosts (planned on a lean one, swap-all here): the claim is the fit.
    report = run.reports["device-small"].memory_report
    assert report["budget_bytes"] == 96 * 2**20
    assert report["mode"] in ("planned", "swap", "swap-all")
    assert report["predicted_peak_bytes"] <= report["budget_bytes"], report


def test_device_small_naive_is_killed_while_training_not_at_start_up(run) -> None:
    m = run.memory
    if not m.enforced:
        pytest.skip(f"memory proof: {m.reason}")
    if m.naive.peak_source != CGROUP:
        pytest.skip(f"this host exposes no cgroup peak counter (peaks from {m.naive.peak_source or 'nothing'})")
    # Measured, not logged: the swap run is the same command in the same container on the same data,
    # so its start-up (imports, data, kernel warm-up) is the naive run's too; it reports the RSS
    # where start-up ends, and that is well under the limit.
    start_up = m.swap.startup_rss_bytes
    assert start_up is not None and start_up < 0.75 * m.mem_limit, f"start-up RSS {start_up} of {m.mem_limit}"
    # The naive run's container then reached its limit (the kernel's own peak counter, exact between
    # samples), and its anonymous memory alone grew past everything start-up holds resident: the
    # kill came from memory allocated after start-up, which only the naive arena accounts for.
    assert m.naive.peak_bytes >= 0.95 * m.mem_limit, f"naive peak {m.naive.peak_bytes} of {m.mem_limit}"
    assert m.naive.anon_bytes > start_up, f"naive anon {m.naive.anon_bytes}, start-up RSS {start_up}"
    assert start_up + m.plan["naive"] > m.mem_limit


def test_fleet_runs_with_tls_and_an_enrollment_token(run) -> None:
    log = run.server_log
    assert "PLAINTEXT" not in log, "the fleet's server must not run --insecure"
    assert "enrollment with the enrollment token" in log
    assert "fleet-demo" not in log  # no default token any more
    for device in run.devices:
        assert (run.reports[device].id or 0) >= 1  # each enrolled, then joined with its own secret


# -- the replicas profile: PostgreSQL, two replicas behind the balancer, the coordinator killed


@pytest.fixture(scope="module")
def replicas_run(request: pytest.FixtureRequest):
    return _fleet(request, fleet.run_replica_fleet, replica_summary)


def test_replicas_finish_every_round_after_the_coordinator_is_killed(replicas_run) -> None:
    r = replicas_run
    assert r.killed_exit == 137, f"{r.killed} was not killed with SIGKILL: exit {r.killed_exit}"
    assert r.status.finished and r.status.rounds_completed == ROUNDS
    closed = [x for x in r.status.rounds if x.state == "closed"]
    assert [x.version for x in closed] == list(range(1, ROUNDS + 1)), "one version per round, agreed by both"
    assert "coordinates the federation" in r.survivor_log, "the survivor took the lease over"
    assert "Traceback" not in r.survivor_log
    for service, info in r.containers.items():  # PostgreSQL, the balancer, the survivor, devices: clean exits
        if service != r.killed:
            assert info.exit_code == 0 and not info.oom_killed and info.restart_count == 0, (service, info)


def test_replicas_lose_no_acknowledged_update(replicas_run) -> None:
    r = replicas_run
    devices = sorted(s for s in r.containers if s.startswith("device"))
    for device in devices:
        info, report = r.containers[device], r.reports[device]
        assert info.exit_code == 0 and report is not None and report.reason == "done", (device, report)
        assert report.rounds_trained >= 1
    # every acknowledged update was aggregated: the devices' acknowledgements add up to the closed rounds' rows
    if all(x.state == "closed" for x in r.status.rounds):
        assert sum(r.reports[d].rounds_trained for d in devices) == sum(x.devices for x in r.status.rounds)
