"""Run the docker-compose fleet for real and check it (what `make docker-test` runs).

    .venv/bin/python docker/fleet.py [--rounds 3] [--timeout 600] [--keep-image] [--logs DIR]
    .venv/bin/python docker/fleet.py --limits 176m,192m,288m,384m,416m     (mem_limit probe, no fleet)

From a clean state: build the image, bring up the fleet of docker/docker-compose.yml under a
unique project name (the one-shot data step runs first), follow the rounds through GetStatus on
the published port, stop the server after its first round, read the version it left in its store,
and start it again on the same volume (restart proof), wait for all rounds, then run device-small's
container once more with `fedpers-client train` in naive mode and in swap mode under the same
mem_limit (memory proof). Peak memory per container is sampled from the cgroup while it runs.
Everything the run made (containers, volumes, network, the image tag) is removed at the end, also
on failure and Ctrl-C. The checks themselves live in tests/test_docker.py; `main` prints the summary.

This file holds the records, the scenario and the CLI; the docker CLI wrapper is fleet_docker.py,
memory sampling fleet_memory.py, the image checks fleet_image.py, the summary fleet_report.py and
the memory-limit probe fleet_limits.py (all next to it: the script's directory is on sys.path).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from fedpers import wire
from fedpers.client.processes import ProcessError, wait_until
from fedpers.client.report import DeviceReport, ReportError
from fedpers.stub import get_status
from fleet_docker import (
    DATA_IN_CONTAINER,
    MODEL_IN_IMAGE,
    REPLICAS,
    REPO,
    SMALL,
    STATE_IN_CONTAINER,
    STORE_IN_CONTAINER,
    SWAP_ARGS,
    ComposeProject,
    ContainerInfo,
    FleetError,
    docker_available,
    run,
    signals_as_interrupt,
)
from fleet_image import ImageChecks, check_image, rebuild_after_code_change
from fleet_limits import LimitRow, limits_enforced, probe_limits
from fleet_memory import PeakSampler
from fleet_report import mib, replica_summary, summary

RESTARTED_DEVICE = "device-0"
MEMORY_RUN_SAMPLE_SECONDS = 0.02  # a naive run climbs from start-up to its limit in well under a second

log = logging.getLogger("fedpers.fleet")


# ------------------------------------------------------------------------------------------ records


@dataclass
class RestartProof:
    """What the server restart and the device restart showed."""

    version_before_stop: int  # from GetStatus just before `docker-compose stop server`
    stopped_at_version: int  # what the stopped server left in its store (`fedpers-server status --store`)
    stop_exit_code: int | None  # after SIGTERM: 0 means a clean shutdown
    version_after_start: int  # GetStatus once healthy again
    devices_running_while_down: list[str]  # device containers still up (retrying) while it was down
    device: str = ""  # the device stopped (SIGTERM) during a round and started again on its state volume
    device_stop_exit_code: int | None = None
    device_stop_report: DeviceReport | None = None  # its --json report when it stopped


@dataclass
class MemoryRun:
    """One `fedpers-client train` run in device-small's container, with its measured memory."""

    mode: str
    exit_code: int | None
    oom_killed: bool
    peak_bytes: int | None  # highest container memory seen, page cache included
    seconds: float
    tail: str = ""
    anon_bytes: int | None = None  # highest anonymous memory seen (cgroup only)
    peak_source: str = ""  # fleet_memory.CGROUP (exact peak counter) or DOCKER_STATS (a lower bound)
    startup_rss_bytes: int | None = None  # RSS after imports, data and warm-up (train --json; runs that finish)


@dataclass
class MemoryProof:
    """device-small's model trained naive and swap under device-small's own mem_limit."""

    mem_limit: int
    enforced: bool
    reason: str = ""  # why the proof was skipped
    naive: MemoryRun | None = None
    swap: MemoryRun | None = None
    plan: dict[str, int] = field(default_factory=dict)  # fedpers-client plan arena bytes per mode, in the container


@dataclass
class FleetResult:
    """Everything one fleet run observed (tests/test_docker.py asserts on it)."""

    project: str
    image: str
    image_size: int = 0
    build_seconds: float = 0.0
    image_checks: ImageChecks | None = None
    rounds_target: int = 0
    status: wire.Status | None = None  # GetStatus at the end
    versions_seen: list[int] = field(default_factory=list)
    containers: dict[str, ContainerInfo] = field(default_factory=dict)
    reports: dict[str, DeviceReport | None] = field(default_factory=dict)  # device -> final --json report
    peaks: dict[str, int] = field(default_factory=dict)  # service -> peak container memory (bytes)
    anon_peaks: dict[str, int] = field(default_factory=dict)  # service -> peak anonymous memory (cgroup)
    peak_source: str = ""
    sampling_problems: list[str] = field(default_factory=list)  # what memory sampling could not read
    server_log: str = ""
    server_final_exit: int | None = None
    restart: RestartProof | None = None
    memory: MemoryProof | None = None
    seconds: float = 0.0
    logs_dir: Path | None = None

    @property
    def devices(self) -> list[str]:
        """The device services, sorted."""
        return sorted(s for s in self.containers if s.startswith("device"))


# ------------------------------------------------------------------------------------------ the scenario


def _by_name(name: str) -> Callable[[], dict[str, str]]:
    """A PeakSampler container list for one container known by name before it exists."""
    found: dict[str, str] = {}

    def containers() -> dict[str, str]:
        if not found:
            proc = run(["docker", "inspect", "-f", "{{.Id}}", name], check=False, merge_stderr=False, timeout=30)
            if proc.returncode == 0 and proc.stdout.strip():
                found[proc.stdout.strip()] = name
        return found

    return containers


def _train_startup_rss(stdout: str) -> int | None:
    """RSS after imports, data and kernel warm-up from `fedpers-client train --json` (None: no JSON)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        return None
    try:
        return int(json.loads(lines[-1])["memory"]["rss_baseline_bytes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FleetError(f"fedpers-client train --json printed no memory.rss_baseline_bytes: {exc}") from None


class Scenario:
    """The steps of the fleet scenario on one compose project; remembers each base version it saw."""

    def __init__(self, project: ComposeProject, timeout: float) -> None:
        self.project = project
        self.timeout = timeout
        self.versions_seen: list[int] = []

    def status(self) -> wire.Status | None:
        """GetStatus over the published port, or None while the server does not answer (starting, away)."""
        try:
            status = get_status(self.project.address, tls=self.project.tls, admin_token=self.project.admin_token,
                                timeout=3.0)
        except grpc.RpcError:
            return None
        if not self.versions_seen or self.versions_seen[-1] != status.version:
            self.versions_seen.append(status.version)
        return status

    def wait_status(self, predicate: Callable[[wire.Status], bool], what: str,
                    timeout: float | None = None) -> wire.Status:
        """Poll GetStatus until `predicate` holds; WaitTimeout naming `what` otherwise."""
        def probe() -> wire.Status | None:
            status = self.status()
            return status if status is not None and predicate(status) else None

        return wait_until(what, probe, self.timeout if timeout is None else timeout, interval=0.5)

    def wait_finished(self, rounds: int, what: str) -> tuple[wire.Status, list[str]]:
        """The status once the federation finished `rounds` rounds and every device container has exited;
        returns it with the device services."""
        status = self.wait_status(lambda s: s.finished and s.rounds_completed >= rounds, what)
        devices = self.project.device_services()
        wait_until("every device to exit", lambda: not any(self.project.info(s).running for s in devices), 180,
                   interval=0.5)
        return status, devices

    def stored_status(self) -> wire.Status:
        """What the stopped server left in its store volume: `fedpers-server status --store --json` in a
        one-off container of the server service (same volume, no ports, the server itself stays down)."""
        proc = self.project.compose("run", "--rm", "--no-deps", "-T", "server", "fedpers-server", "status",
                                    "--store", STORE_IN_CONTAINER, "--json", timeout=120, merge_stderr=False)
        try:
            return wire.status_from_json(proc.stdout)
        except wire.MalformedMessage as exc:
            raise FleetError(f"fedpers-server status --store printed no status ({exc}):\n{proc.stdout[-1000:]}\n"
                             f"{proc.stderr[-1000:]}") from None

    def restart_server(self) -> RestartProof:
        """Stop the server (SIGTERM) between rounds 1 and R, start it again on the same volume."""
        p = self.project
        before = self.wait_status(lambda s: s.version >= 1 or s.finished, "the first round to close")
        if before.finished:
            raise FleetError("the federation finished before the server could be restarted; raise --rounds")
        p.compose("stop", "-t", "30", "server", timeout=120)
        down = p.info("server")
        stopped = self.stored_status()
        devices_up = sorted(c.service for c in (p.info(s) for s in p.device_services()) if c.running)
        time.sleep(3.0)  # let the devices notice: their calls now fail and they back off
        p.compose("start", "server", timeout=120)
        wait_until("the restarted server to be healthy", lambda: p.server_health() == "healthy", 120, interval=0.5)
        after = self.wait_status(lambda s: True, "GetStatus after the restart", 60)
        return RestartProof(version_before_stop=before.version, stopped_at_version=stopped.version,
                            stop_exit_code=down.exit_code, version_after_start=after.version,
                            devices_running_while_down=devices_up)

    def restart_device(self, proof: RestartProof, service: str) -> None:
        """SIGTERM one device while a round is open, then start it again on the same state volume."""
        p = self.project
        status = self.wait_status(lambda s: s.round_state == "open" or s.finished, "a round to open")
        if status.finished:
            raise FleetError(f"the federation finished before {service} could be restarted; raise --rounds")
        p.compose("stop", "-t", "60", service, timeout=120)
        proof.device = service
        proof.device_stop_exit_code = p.info(service).exit_code
        proof.device_stop_report = self.device_report(service)
        p.compose("start", service, timeout=120)

    def device_report(self, service: str) -> DeviceReport | None:
        """The agent's last `--json` report (the last JSON line on its stdout); None if it printed none."""
        lines = [line.strip() for line in self.project.logs(service, stdout_only=True).splitlines()]
        reports = [line for line in lines if line.startswith("{")]
        if not reports:
            return None
        try:
            return DeviceReport.from_json(reports[-1])
        except ReportError as exc:
            raise FleetError(f"{service} printed a report that is not a DeviceReport: {exc}") from None

    def plan_totals(self) -> dict[str, int]:
        """`fedpers-client plan` of the fleet model in the image: arena bytes per memory mode."""
        out = {}
        for mode in ("naive", "planned", "swap"):
            proc = run(["docker", "run", "--rm", self.project.image, "fedpers-client", "plan", MODEL_IN_IMAGE,
                        "--memory", mode, "--json"], timeout=120, merge_stderr=False)
            out[mode] = int(json.loads(proc.stdout.strip().splitlines()[-1])["totals"]["arena_bytes"])
        return out

    def memory_run(self, mode: str, extra: Sequence[str]) -> MemoryRun:
        """device-small's container (same mem_limit, same data) once more: one epoch of local training,
        its memory read every MEMORY_RUN_SAMPLE_SECONDS by a sampler of its own."""
        p = self.project
        name = p.track(f"{p.project}_{SMALL}_{mode}")
        watch = PeakSampler(_by_name(name), interval=MEMORY_RUN_SAMPLE_SECONDS, relist=0.0, name=f"peaks-{mode}")
        watch.start()
        t0 = time.monotonic()
        try:
            proc = p.compose("run", "--no-deps", "-T", "--name", name, SMALL, "fedpers-client", "--log-level", "INFO",
                             "train", MODEL_IN_IMAGE, "--data", DATA_IN_CONTAINER, "--epochs", "1",
                             "--swap-dir", STATE_IN_CONTAINER, "--json", *extra, timeout=600, check=False)
        finally:
            watch.stop()
        seconds = time.monotonic() - t0
        state = p.inspect(name)["State"]
        startup = _train_startup_rss(p.container_logs(name, stdout_only=True))
        p.remove(name)
        return MemoryRun(mode=mode, exit_code=state["ExitCode"], oom_killed=bool(state["OOMKilled"]),
                         peak_bytes=watch.peak(name), seconds=seconds,
                         tail="\n".join((proc.stdout or "").splitlines()[-5:]), anon_bytes=watch.anon_peak(name),
                         peak_source=watch.sources.get(name, ""), startup_rss_bytes=startup)

    def memory_proof(self, limit: int) -> MemoryProof:
        """Naive then swap training under `limit` (device-small's), where this host enforces limits."""
        proof = MemoryProof(mem_limit=limit, enforced=False)
        if not limit:
            proof.reason = f"{SMALL} has no mem_limit in the compose file"
        elif not limits_enforced(self.project, limit):
            proof.reason = "this Docker host does not enforce container memory limits (probe survived)"
        else:
            proof.enforced = True
            proof.plan = self.plan_totals()
            proof.naive = self.memory_run("naive", ("--memory", "naive"))
            proof.swap = self.memory_run("swap", SWAP_ARGS)
        return proof


def run_fleet(rounds: int = 3, timeout: float = 600.0, keep_image: bool = False, logs_dir: Path | None = None,
              memory_proof: bool = True) -> FleetResult:
    """The whole scenario; returns what was observed (tests/test_docker.py asserts on it)."""
    t_start = time.monotonic()
    project = ComposeProject(rounds=rounds, keep_image=keep_image)
    scenario = Scenario(project, timeout)
    result = FleetResult(project=project.project, image=project.image, rounds_target=rounds)
    result.logs_dir = logs_dir or REPO / "runs" / f"docker-{project.project}"
    sampler = PeakSampler(project.running_containers)
    ok = False
    with signals_as_interrupt():
        try:
            log.info("building %s", project.image)
            result.build_seconds = project.build()
            result.image_size = project.image_size()
            log.info("image %s: %s, built in %.0fs", project.image, mib(result.image_size), result.build_seconds)
            result.image_checks = check_image(project)
            rebuild_after_code_change(project, result.image_checks)
            sampler.start()
            project.up()
            log.info("fleet %s is up; server on %s", project.project, project.address)
            result.restart = scenario.restart_server()
            log.info("server restarted: stopped at v%d, continued at v%d", result.restart.stopped_at_version,
                     result.restart.version_after_start)
            scenario.restart_device(result.restart, RESTARTED_DEVICE)
            log.info("%s stopped (exit %s) and started again", RESTARTED_DEVICE, result.restart.device_stop_exit_code)
            result.status, devices = scenario.wait_finished(rounds, f"{rounds} rounds")
            result.versions_seen = scenario.versions_seen
            project.compose("stop", "-t", "30", timeout=120)  # SIGTERM to the (idle) server: must exit 0
            result.containers = {s: project.info(s) for s in project.services()}
            result.server_final_exit = result.containers["server"].exit_code
            result.server_log = project.logs("server")
            result.reports = {s: scenario.device_report(s) for s in devices}
            if memory_proof:
                result.memory = scenario.memory_proof(result.containers[SMALL].mem_limit)
            result.peaks = sampler.stop()
            result.anon_peaks = dict(sampler.anon_peaks)
            result.peak_source = sampler.source_of(devices)
            result.sampling_problems = list(sampler.problems)
            result.seconds = time.monotonic() - t_start
            ok = True
            return result
        finally:
            if not ok:
                log.error("fleet run failed; container logs in %s", result.logs_dir)
            for step in (sampler.stop, lambda: ok or project.save_logs(result.logs_dir), project.teardown):
                try:
                    step()
                except Exception:  # noqa: BLE001 - the remaining clean-up steps must still run
                    log.exception("clean-up step failed")


# ------------------------------------------------------------------------------------------ the replicas profile


@dataclass
class ReplicaRun:
    """What the replicas profile's run observed (tests/test_docker.py asserts on it)."""

    project: str
    rounds_target: int
    coordinator: str = ""  # the replica holding the lease when one was killed
    killed: str = ""  # the replica killed with SIGKILL mid-round
    killed_exit: int | None = None
    killed_at_version: int = 0
    killed_with_updates: int = 0  # updates already in the open round when it was killed
    status: wire.Status | None = None  # GetStatus through the balancer at the end
    versions_seen: list[int] = field(default_factory=list)
    containers: dict[str, ContainerInfo] = field(default_factory=dict)
    reports: dict[str, DeviceReport | None] = field(default_factory=dict)
    survivor_log: str = ""
    seconds: float = 0.0


def _coordinator(project: ComposeProject) -> str:
    """The replica that logged last that it coordinates the federation."""
    marks = {s: project.logs(s).rfind("coordinates the federation") for s in REPLICAS}
    holder = max(marks, key=lambda s: marks[s])
    if marks[holder] < 0:
        raise FleetError("no replica says it coordinates the federation")
    return holder


def run_replica_fleet(rounds: int = 3, timeout: float = 600.0, logs_dir: Path | None = None) -> ReplicaRun:
    """The replicas profile: PostgreSQL, two replicas behind the balancer, the five devices. Once a round
    has closed and the next one holds an update, the coordinating replica is killed with SIGKILL; the
    other must finish every round, every device must finish."""
    t0 = time.monotonic()
    project = ComposeProject(rounds=rounds, replicas=True)
    scenario = Scenario(project, timeout)
    result = ReplicaRun(project=project.project, rounds_target=rounds)
    logs_dir = logs_dir or REPO / "runs" / f"docker-{project.project}"
    ok = False
    with signals_as_interrupt():
        try:
            project.build()
            project.up()
            log.info("replicas fleet %s is up; balancer on %s", project.project, project.address)
            scenario.wait_status(lambda s: s.version >= 1 or s.finished, "the first round to close")
            status = scenario.wait_status(
                lambda s: s.finished or (s.round_state == "open" and bool(s.rounds) and s.rounds[-1].devices >= 1),
                "an open round holding an update")
            if status.finished:
                raise FleetError("the federation finished before a replica could be killed; raise --rounds")
            result.coordinator = result.killed = _coordinator(project)
            result.killed_at_version, result.killed_with_updates = status.version, status.rounds[-1].devices
            run(["docker", "kill", "-s", "KILL", project.container_id(result.killed)], timeout=60)
            log.info("killed %s (the coordinator) at version %d with %d update(s) in the open round",
                     result.killed, result.killed_at_version, result.killed_with_updates)
            result.status, devices = scenario.wait_finished(rounds, f"{rounds} rounds after the kill")
            result.versions_seen = scenario.versions_seen
            survivor = next(s for s in REPLICAS if s != result.killed)
            result.survivor_log = project.logs(survivor)
            project.compose("stop", "-t", "30", timeout=120)
            result.containers = {s: project.info(s) for s in project.services()}
            result.killed_exit = result.containers[result.killed].exit_code
            result.reports = {s: scenario.device_report(s) for s in devices}
            result.seconds = time.monotonic() - t0
            ok = True
            return result
        finally:
            if not ok:
                log.error("replicas fleet run failed; container logs in %s", logs_dir)
            for step in (lambda: ok or project.save_logs(logs_dir), project.teardown):
                try:
                    step()
                except Exception:  # noqa: BLE001 - the remaining clean-up steps must still run
                    log.exception("clean-up step failed")


# ------------------------------------------------------------------------------------------ the CLI


def _print_row(row: LimitRow) -> None:
    print(f"{row.mode:<6} under {row.limit:>6}: exit {row.exit_code:>3}  OOM-killed {row.oom_killed}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """`docker/fleet.py`: the fleet scenario and its summary, or the --limits probe."""
    p = argparse.ArgumentParser(prog="docker/fleet.py", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the rounds (default 600)")
    p.add_argument("--keep-image", action="store_true", help="do not remove the image tag at the end")
    p.add_argument("--no-memory-proof", action="store_true", help="skip the naive/swap runs of device-small")
    p.add_argument("--logs", type=Path, default=None, help="where container logs go (default runs/docker-<project>)")
    p.add_argument("--limits", default=None, metavar="L1,L2,...",
                   help="instead of the fleet: train device-small's model naive and swap under each limit")
    p.add_argument("--replicas", action="store_true",
                   help="instead: the replicas profile (PostgreSQL, two replicas behind a balancer, one killed)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reason = docker_available()
    if reason:
        print(f"fleet: {reason}", file=sys.stderr)
        return 2
    if args.limits:
        try:
            probe_limits([x.strip() for x in args.limits.split(",") if x.strip()], args.keep_image, _print_row)
        except (FleetError, KeyboardInterrupt) as exc:
            print(f"fleet: {exc or 'interrupted'}", file=sys.stderr)
            return 1
        return 0
    if args.replicas:
        try:
            replica_run = run_replica_fleet(args.rounds, args.timeout, args.logs)
        except (FleetError, ProcessError) as exc:
            print(f"fleet: {exc}", file=sys.stderr)
            return 1
        print(replica_summary(replica_run))
        return 0
    try:
        result = run_fleet(args.rounds, args.timeout, args.keep_image, args.logs, not args.no_memory_proof)
    except (FleetError, ProcessError) as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fleet: interrupted; torn down", file=sys.stderr)
        return 130
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
