"""The docker-compose fleet for real (docker/fleet.py): image, rounds, isolation, restart, memory limits.

One module-scoped run builds the image, brings up docker/docker-compose.yml under a unique project
name, restarts the server mid-run, waits for 3 rounds, runs device-small once more in naive and in
swap mode under its mem_limit, prints the per-device table and tears everything down. Every test
below asserts on what that run observed. Skipped, with the reason, where no Docker daemon answers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3


def _load_fleet():
    spec = importlib.util.spec_from_file_location("fedpers_docker_fleet", REPO / "docker" / "fleet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


fleet = _load_fleet()


@pytest.fixture(scope="module")
def run(request: pytest.FixtureRequest):
    reason = fleet.docker_available()
    if reason:
        pytest.skip(f"Docker fleet test needs a Docker daemon and docker-compose: {reason}")
    result = fleet.run_fleet(rounds=ROUNDS, timeout=600)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + fleet.summary(result), flush=True)
    return result


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
        assert report.get("rounds_trained", 0) >= 1, f"{device} never contributed: {report}"
        assert report.get("bytes_up", 0) > 0
        assert report.get("reason") == "done" and report.get("name") == device


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
        assert set(mounts) == {"/var/lib/fedpers/data", "/var/lib/fedpers/state"}, mounts
        data_volume, data_rw = mounts["/var/lib/fedpers/data"]
        state_volume, state_rw = mounts["/var/lib/fedpers/state"]
        assert data_volume == f"{run.project}_{device}-data" and not data_rw
        assert state_volume == f"{run.project}_{device}-state" and state_rw
        assert run.containers[device].user == "fedpers"
    server = run.containers["server"]
    assert server.ports and all(ip == "127.0.0.1" for ip, _ in server.ports), server.ports
    assert [dest for _, dest, _ in server.mounts] == ["/var/lib/fedpers/store"]


def test_server_restart_continues_from_its_last_version(run) -> None:
    r = run.restart
    assert r.stop_exit_code == 0, "SIGTERM must stop the server cleanly"
    assert r.stopped_at_version >= max(1, r.version_before_stop)
    assert r.version_after_start == r.stopped_at_version, "the restarted server did not continue from its store"
    assert len(r.devices_running_while_down) == len(run.devices), "devices must wait for the server, not exit"


def test_device_sigterm_is_clean_and_it_rejoins_as_itself(run) -> None:
    r = run.restart
    assert r.device_stop_exit_code == 0, f"{r.device} did not exit 0 on SIGTERM"
    assert r.device_stop_report.get("reason") == "stopped"
    final = run.reports[r.device]
    assert final["id"] == r.device_stop_report["id"] and final["name"] == r.device
    assert final["rounds_trained"] >= r.device_stop_report.get("rounds_trained", 0)


def test_device_small_naive_is_oom_killed_where_swap_fits(run) -> None:
    m = run.memory
    if not m.enforced:
        pytest.skip(f"memory proof: {m.reason}")
    assert m.plan["naive"] > 2 * m.plan["swap"]
    assert m.naive.oom_killed and m.naive.exit_code == 137, f"naive under {m.mem_limit} bytes: {m.naive}"
    # killed while training, not while starting: its plan was made and logged before the kill
    assert "training plan: memory=naive" in m.naive.tail, m.naive.tail
    assert m.swap.exit_code == 0 and not m.swap.oom_killed, f"swap under {m.mem_limit} bytes: {m.swap}"
    small = run.containers["device-small"]
    assert small.mem_limit == m.mem_limit and small.exit_code == 0 and not small.oom_killed
    assert run.reports["device-small"]["memory_report"]["mode"] == "swap-all"  # what its 96MiB budget picks
