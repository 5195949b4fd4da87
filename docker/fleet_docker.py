"""The docker CLI as the fleet check uses it: `run`, `docker_available`, and one compose project.

`ComposeProject` is one project of docker/docker-compose.yml under a unique name and image tag:
build, up, list and inspect its containers, read their logs, run one-off containers, and remove
everything it made. What the compose file and the image put where is named here once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpers.client.processes import free_port

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"
REPLICAS_FILE = REPO / "docker" / "docker-compose.replicas.yml"  # the replicas profile, on top of COMPOSE_FILE
PG_DOCKERFILE = REPO / "docker" / "postgres.Dockerfile"
REPLICAS = ("server", "server-b")  # the replicas profile's fedpers-server services
DOCKERFILE = REPO / "docker" / "Dockerfile"
MODEL_IN_IMAGE = "/opt/fedpers/share/fleet/fleet_model.ini"
DATA_IN_CONTAINER = "/var/lib/fedpers/data/data.npz"
STATE_IN_CONTAINER = "/var/lib/fedpers/state"
STORE_IN_CONTAINER = "/var/lib/fedpers/store"  # the server's --store (the server-store volume)
SMALL = "device-small"
SWAP_ARGS = ("--memory", "swap", "--memory-budget", "64MiB")  # as device-small's FEDPERS_DEVICE_ARGS

log = logging.getLogger("fedpers.fleet")


class FleetError(RuntimeError):
    """The fleet could not be brought up or did not get where it should; the message says where."""


class DockerUnavailable(FleetError):
    """No Docker daemon or no docker-compose here (the pytest test skips with this reason)."""


def run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 300.0, check: bool = True,
        capture: bool = True, merge_stderr: bool = True) -> subprocess.CompletedProcess:
    """Run a command; FleetError (with its output) when it fails and `check`.

    Captured stderr is merged into stdout unless `merge_stderr` is False (then stdout is the
    command's own output only, e.g. JSON to parse, and stderr is kept apart)."""
    log.debug("$ %s", " ".join(argv))
    if not capture:
        stdout = stderr = None
    else:
        stdout, stderr = subprocess.PIPE, (subprocess.STDOUT if merge_stderr else subprocess.PIPE)
    try:
        proc = subprocess.run(list(argv), env=env, timeout=timeout, text=True, stdout=stdout, stderr=stderr)
    except subprocess.TimeoutExpired as exc:
        raise FleetError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from exc
    except FileNotFoundError as exc:
        raise DockerUnavailable(f"{argv[0]} is not installed") from exc
    if check and proc.returncode != 0:
        out = ((proc.stdout or "") + (proc.stderr or ""))[-3000:]
        raise FleetError(f"exit {proc.returncode}: {' '.join(argv)}\n{out}")
    return proc


def docker_available() -> str | None:
    """None when a daemon answers and docker-compose exists; otherwise the reason (to skip with)."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    if shutil.which("docker-compose") is None:
        return "docker-compose (v1) is not installed"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=20)
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"docker info failed: {exc}"
    if proc.returncode != 0 or not proc.stdout.strip():
        said = (proc.stderr or proc.stdout or "").strip().splitlines()
        return f"no Docker daemon reachable ({said[-1] if said else f'docker info exit {proc.returncode}'})"
    return None


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM -> KeyboardInterrupt, so `finally` tears the fleet down (main thread only;
    SIGINT too because a shell starts background jobs with it ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


@dataclass
class ContainerInfo:
    """What `docker inspect` says about one container once it is done."""

    service: str
    name: str
    exit_code: int | None
    oom_killed: bool
    restart_count: int
    running: bool
    mem_limit: int  # bytes, 0 = none
    user: str = ""
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)  # (volume name, destination, writable)
    ports: list[tuple[str, str]] = field(default_factory=list)  # published (host ip, host port)

    @classmethod
    def from_inspect(cls, service: str, data: dict[str, Any]) -> ContainerInfo:
        """The record of one `docker inspect` object."""
        state = data["State"]
        bindings = (data["HostConfig"].get("PortBindings") or {}).values()
        return cls(service=service, name=data["Name"].lstrip("/"),
                   exit_code=None if state["Running"] else state["ExitCode"],
                   oom_killed=bool(state["OOMKilled"]), restart_count=int(data.get("RestartCount", 0)),
                   running=bool(state["Running"]), mem_limit=int(data["HostConfig"].get("Memory") or 0),
                   user=data["Config"].get("User") or "",
                   mounts=[(m.get("Name") or m.get("Source", ""), m["Destination"], bool(m["RW"]))
                           for m in data.get("Mounts", [])],
                   ports=[(b.get("HostIp", ""), b.get("HostPort", "")) for bs in bindings for b in bs or ()])


class ComposeProject:
    """One project of docker/docker-compose.yml under a unique name and image tag; `teardown` removes
    all it made (containers, volumes, network, the image tag, one-off containers it named)."""

    def __init__(self, rounds: int = 3, project: str | None = None, image: str | None = None,
                 port: int | None = None, keep_image: bool = False, replicas: bool = False) -> None:
        """`replicas`: the replicas profile (docker-compose.replicas.yml on top): PostgreSQL, two server
        replicas, the load balancer; `address` is then the balancer's published port."""
        self.project = project or f"fedpers-test-{secrets.token_hex(4)}"
        self.image = image or f"fedpers-fleet:{self.project}"
        self.port = port or free_port()
        self.rounds = rounds
        self.keep_image = keep_image
        self.address = f"127.0.0.1:{self.port}"
        self.admin_token = secrets.token_urlsafe(24)  # the server's, for GetStatus (compose passes it on)
        self.tls: Any = None  # trusting the fleet's throwaway CA, once `up` made it
        self.env = dict(os.environ, FEDPERS_IMAGE=self.image, FEDPERS_PORT=str(self.port),
                        FEDPERS_ROUNDS=str(rounds), COMPOSE_PROJECT_NAME=self.project,
                        FEDPERS_ADMIN_TOKEN=self.admin_token)
        self.replicas = replicas
        self.files = [COMPOSE_FILE, REPLICAS_FILE] if replicas else [COMPOSE_FILE]
        self.pg_image = f"fedpers-fleet-pg:{self.project}"
        if replicas:
            lb_port = free_port()
            self.address = f"127.0.0.1:{lb_port}"
            self.env.update(FEDPERS_SERVER_ADDRESS="lb:50051", FEDPERS_LB_PORT=str(lb_port),
                            FEDPERS_PG_IMAGE=self.pg_image, FEDPERS_MIN_DEVICES="4")
        self._built = False
        self._extra_containers: list[str] = []

    # -- the CLI

    def compose(self, *args: str, timeout: float = 300.0, check: bool = True,
                merge_stderr: bool = True) -> subprocess.CompletedProcess:
        """`docker-compose -f docker/docker-compose.yml -p PROJECT ARGS...` with this project's settings."""
        files = [x for f in self.files for x in ("-f", str(f))]
        return run(["docker-compose", *files, "-p", self.project, *args], env=self.env,
                   timeout=timeout, check=check, merge_stderr=merge_stderr)

    def track(self, name: str) -> str:
        """Remember a container this run names itself (docker run/compose run), so teardown removes it."""
        self._extra_containers.append(name)
        return name

    def remove(self, name: str) -> None:
        """Remove one named container now (teardown tries again)."""
        run(["docker", "rm", "-f", name], check=False)

    # -- what is there

    def services(self) -> list[str]:
        """The compose file's services."""
        return self.compose("config", "--services").stdout.split()

    def device_services(self) -> list[str]:
        """The compose file's device services (`device-*`)."""
        return [s for s in self.services() if s.startswith("device")]

    def container_ids(self, service: str | None = None, running_only: bool = False) -> dict[str, str]:
        """Full container id -> service for this project's containers (all states unless running_only).
        One-off containers (`docker-compose run`) are keyed by their container name instead."""
        fmt = '{{.ID}} {{.Label "com.docker.compose.service"}} {{.Label "com.docker.compose.oneoff"}} {{.Names}}'
        argv = ["docker", "ps", "--no-trunc", "--format", fmt,
                "--filter", f"label=com.docker.compose.project={self.project}"]
        if not running_only:
            argv.append("-a")
        if service:
            argv += ["--filter", f"label=com.docker.compose.service={service}",
                     "--filter", "label=com.docker.compose.oneoff=False"]
        out: dict[str, str] = {}
        for line in run(argv, timeout=60).stdout.splitlines():
            parts = line.split()
            if len(parts) == 4:
                cid, svc, oneoff, name = parts
                out[cid] = name if oneoff == "True" else svc
        return out

    def running_containers(self) -> dict[str, str]:
        """Running container id -> service (or one-off container name); what the memory sampler watches."""
        return self.container_ids(running_only=True)

    def container_id(self, service: str) -> str:
        """The one (not one-off) container of a service; FleetError when there is none or several."""
        ids = [cid for cid, svc in self.container_ids(service).items() if svc == service]
        if len(ids) != 1:
            raise FleetError(f"expected one container for {service}, found {len(ids)}")
        return ids[0]

    def inspect(self, cid: str) -> dict[str, Any]:
        """`docker inspect` of one container or image, as a dict."""
        return json.loads(run(["docker", "inspect", cid], timeout=60).stdout)[0]

    def info(self, service: str) -> ContainerInfo:
        """State, limit, user, mounts and ports of a service's container."""
        return ContainerInfo.from_inspect(service, self.inspect(self.container_id(service)))

    def logs(self, service: str, stdout_only: bool = False) -> str:
        """A service container's log (stdout and stderr, or stdout alone)."""
        return self.container_logs(self.container_id(service), stdout_only)

    def container_logs(self, container: str, stdout_only: bool = False) -> str:
        """Any container's log by id or name (stdout and stderr, or stdout alone)."""
        proc = run(["docker", "logs", container], timeout=60, merge_stderr=not stdout_only)
        return proc.stdout

    def server_health(self) -> str:
        """The server container's HEALTHCHECK state (starting, healthy, unhealthy; '' before any)."""
        data = self.inspect(self.container_id("server"))
        return ((data["State"].get("Health") or {}).get("Status")) or ""

    def image_size(self) -> int:
        """Bytes of the image this project built."""
        return int(run(["docker", "image", "inspect", "-f", "{{.Size}}", self.image]).stdout.strip())

    # -- steps

    def build(self) -> float:
        """Build the image under this project's tag; returns the seconds it took."""
        t0 = time.monotonic()
        run(["docker", "build", "-f", str(DOCKERFILE), "-t", self.image, str(REPO)], env=self.env, timeout=1800)
        self._built = True
        if self.replicas:
            run(["docker", "build", "-f", str(PG_DOCKERFILE), "-t", self.pg_image, str(PG_DOCKERFILE.parent)],
                env=self.env, timeout=1800)
        return time.monotonic() - t0

    def up(self) -> None:
        """Start the whole compose file (data step, server, devices) detached, from a clean project."""
        leftovers = self.container_ids()
        if leftovers:
            raise FleetError(f"project {self.project} is not clean: {sorted(set(leftovers.values()))}")
        self.compose("up", "-d", "--no-build", timeout=600)
        from fedpers.tls import TlsConfig  # the CA the one-shot certs step made, to reach the server over TLS

        ca = Path(tempfile.mkdtemp(prefix="fedpers-fleet-ca-")) / "ca.pem"
        run(["docker", "cp", f"{self.container_id('certs')}:/var/lib/fedpers/tls/ca.pem", str(ca)])
        self.tls = TlsConfig(ca=ca)

    def save_logs(self, folder: Path) -> None:
        """Every container's log into `folder/<service>.log` (kept for a failed run)."""
        folder.mkdir(parents=True, exist_ok=True)
        for cid, service in self.container_ids().items():
            try:
                proc = run(["docker", "logs", "--timestamps", cid], timeout=60, check=False)
                (folder / f"{service}.log").write_text(proc.stdout or "")
            except (FleetError, OSError) as exc:
                log.warning("could not save the log of %s: %s", service, exc)

    def teardown(self) -> None:
        """Remove everything this project made; every step is tried even when one fails."""
        files = [x for f in self.files for x in ("-f", str(f))]
        steps: list[list[str]] = [
            ["docker-compose", *files, "-p", self.project, "down", "-v", "--remove-orphans", "-t", "30"],
        ]
        steps += [["docker", "rm", "-f", "-v", name] for name in self._extra_containers]
        if self._built and not self.keep_image:
            # --no-prune keeps the untagged parent layers: the next build reuses the dependency layer.
            steps.append(["docker", "rmi", "--no-prune", self.image])
            if self.replicas:
                steps.append(["docker", "rmi", "--no-prune", self.pg_image])
        for argv in steps:
            try:
                run(argv, env=self.env, timeout=300, check=False)
            except FleetError as exc:
                log.warning("teardown step failed: %s", exc)
        leftovers = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"],
                        check=False).stdout.split()
        volumes = run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}"],
                      check=False).stdout.split()
        if leftovers or volumes:
            log.warning("teardown left %d containers and %d volumes of %s", len(leftovers), len(volumes),
                        self.project)
