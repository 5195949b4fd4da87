"""Run the docker-compose fleet for real and check it (what `make docker-test` runs).

    .venv/bin/python docker/fleet.py [--rounds 3] [--timeout 600] [--keep-image] [--logs DIR]
    .venv/bin/python docker/fleet.py --limits 176m,192m,288m,384m,416m     (mem_limit probe, no fleet)

From a clean state: build the image, bring up the fleet of docker/docker-compose.yml under a
unique project name (the one-shot data step runs first), follow the rounds through GetStatus on
the published port, stop the server after its first round and start it again on the same volume
(restart proof), wait for all rounds, then run device-small's container once more with
`fedpers-client train` in naive mode and in swap mode under the same mem_limit (memory proof).
Peak memory per container is sampled from the cgroup while it runs. Everything the run made
(containers, volumes, network, the image tag) is removed at the end, also on failure and Ctrl-C.
The checks themselves live in tests/test_docker.py; `main` prints them and the per-device table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
MODEL_IN_IMAGE = "/opt/fedpers/share/fleet/fleet_model.ini"
DATA_IN_CONTAINER = "/var/lib/fedpers/data/data.npz"
STATE_IN_CONTAINER = "/var/lib/fedpers/state"
SMALL = "device-small"
RESTARTED_DEVICE = "device-0"
SWAP_ARGS = ("--memory", "swap", "--memory-budget", "64MiB")  # as device-small's FEDPERS_DEVICE_ARGS

log = logging.getLogger("fedpers.fleet")


class FleetError(RuntimeError):
    """The fleet could not be brought up or did not get where it should; the message says where."""


class DockerUnavailable(FleetError):
    """No Docker daemon or no docker-compose here (the pytest test skips with this reason)."""


# ------------------------------------------------------------------------------------------ records


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


@dataclass
class RestartProof:
    version_before_stop: int  # from GetStatus just before `docker-compose stop server`
    stopped_at_version: int  # the server's own "stopped at version N" log line
    stop_exit_code: int | None  # after SIGTERM: 0 means a clean shutdown
    version_after_start: int  # GetStatus once healthy again
    devices_running_while_down: list[str]  # device containers still up (retrying) while it was down
    device: str = ""  # the device stopped (SIGTERM) during a round and started again on its state volume
    device_stop_exit_code: int | None = None
    device_stop_report: dict[str, Any] = field(default_factory=dict)  # its --json report when it stopped


@dataclass
class MemoryRun:
    mode: str
    exit_code: int | None
    oom_killed: bool
    peak_bytes: int | None
    seconds: float
    tail: str = ""
    anon_bytes: int | None = None


@dataclass
class MemoryProof:
    mem_limit: int
    enforced: bool
    reason: str = ""  # why the proof was skipped
    naive: MemoryRun | None = None
    swap: MemoryRun | None = None
    plan: dict[str, int] = field(default_factory=dict)  # fedpers-client plan totals in the container


@dataclass
class ImageChecks:
    """What the image holds and how it was layered."""

    help_exit: dict[str, int] = field(default_factory=dict)  # `docker run IMAGE <cmd> --help` -> exit code
    uid: int = -1
    compilers: list[str] = field(default_factory=list)
    pip_caches: list[str] = field(default_factory=list)
    numba_cache_writable: bool = False
    healthcheck: list[str] = field(default_factory=list)
    deps_cached_after_code_change: bool | None = None  # rebuild after a code edit reused the dependency layer
    code_rebuild_seconds: float = 0.0


@dataclass
class FleetResult:
    project: str
    image: str
    image_size: int = 0
    build_seconds: float = 0.0
    image_checks: ImageChecks | None = None
    rounds_target: int = 0
    status: Any = None  # common.wire.Status at the end
    versions_seen: list[int] = field(default_factory=list)
    containers: dict[str, ContainerInfo] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # device service -> final JSON report
    peaks: dict[str, int] = field(default_factory=dict)  # service -> peak container memory (bytes)
    anon_peaks: dict[str, int] = field(default_factory=dict)  # service -> peak anonymous memory (cgroup)
    peak_source: str = ""
    server_log: str = ""
    server_final_exit: int | None = None
    restart: RestartProof | None = None
    memory: MemoryProof | None = None
    seconds: float = 0.0
    logs_dir: Path | None = None

    @property
    def devices(self) -> list[str]:
        return sorted(s for s in self.containers if s.startswith("device"))


# ------------------------------------------------------------------------------------------ helpers


def run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 300.0, check: bool = True,
        capture: bool = True) -> subprocess.CompletedProcess:
    """Run a command; FleetError (with its output) when it fails and `check`."""
    log.debug("$ %s", " ".join(argv))
    try:
        proc = subprocess.run(list(argv), env=env, timeout=timeout, text=True,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.STDOUT if capture else None)
    except subprocess.TimeoutExpired as exc:
        raise FleetError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from exc
    except FileNotFoundError as exc:
        raise DockerUnavailable(f"{argv[0]} is not installed") from exc
    if check and proc.returncode != 0:
        out = (proc.stdout or "")[-3000:]
        raise FleetError(f"exit {proc.returncode}: {' '.join(argv)}\n{out}")
    return proc


def docker_available() -> str | None:
    """None when a daemon answers and docker-compose exists; otherwise the reason."""
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


def deps_step_cached(build_output: str) -> bool:
    """Did the `pip install -r` (dependencies) step of a docker build come from the cache?"""
    lines = build_output.splitlines()
    for i, line in enumerate(lines):
        if "pip install -r" in line:
            if "CACHED" in line:  # BuildKit
                return True
            for nxt in lines[i + 1:]:  # legacy builder: " ---> Using cache" before the next step
                if nxt.startswith("Step "):
                    break
                if "Using cache" in nxt:
                    return True
            return False
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_status(address: str, timeout: float = 3.0, tls: Any = None, admin_token: str = "") -> Any | None:
    """GetStatus over the published port (TLS, admin token) -> common.wire.Status, or None while it does not answer."""
    import grpc
    from fedpers.stub import get_status as status_of

    try:
        return status_of(address, tls=tls, admin_token=admin_token, timeout=timeout)
    except grpc.RpcError:
        return None


def parse_size(text: str) -> int:
    """'190.5MiB' / '1.2GiB' / '512kB' (docker stats) -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)\s*", text)
    if not m:
        return 0
    unit = m.group(2)
    base = 1024 if "i" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0] if unit[0] != "B" else "B"]
    return int(float(m.group(1)) * base**power)


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------ memory sampling


CGROUP_PEAK_FILES = (
    "/sys/fs/cgroup/memory/docker/{id}/memory.max_usage_in_bytes",  # v1, cgroupfs driver
    "/sys/fs/cgroup/memory/system.slice/docker-{id}.scope/memory.max_usage_in_bytes",  # v1, systemd driver
    "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.peak",  # v2, systemd driver
    "/sys/fs/cgroup/docker/{id}/memory.peak",  # v2, cgroupfs driver
)


class PeakSampler(threading.Thread):
    """Keeps the highest memory use seen per compose service: the cgroup's own peak counter when this
    host exposes it (exact), else `docker stats` samples (a lower bound)."""

    def __init__(self, fleet: Fleet, interval: float = 0.5) -> None:
        super().__init__(name="fleet-peaks", daemon=True)
        self.fleet = fleet
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.anon_peaks: dict[str, int] = {}
        self.source = ""
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def _record(self, service: str, value: int) -> None:
        with self._lock:
            self.peaks[service] = max(self.peaks.get(service, 0), value)

    def _record_anon(self, service: str, stat: Path) -> None:
        """Anonymous memory (v1 total_rss, v2 anon): what the limit must hold; page cache is reclaimable."""
        with contextlib.suppress(OSError, ValueError):
            fields = dict(line.split() for line in stat.read_text().splitlines() if line.count(" ") == 1)
            value = int(fields.get("total_rss", fields.get("anon", 0)))
            with self._lock:
                self.anon_peaks[service] = max(self.anon_peaks.get(service, 0), value)

    def sample_once(self, containers: dict[str, str]) -> None:
        missing = {}
        for cid, service in containers.items():
            for pattern in CGROUP_PEAK_FILES:
                path = Path(pattern.format(id=cid))
                try:
                    value = int(path.read_text().strip())
                except (OSError, ValueError):
                    continue
                self.source = self.source or "cgroup peak counter"
                self._record(service, value)
                self._record_anon(service, path.parent / "memory.stat")
                break
            else:
                missing[cid] = service
        if missing:
            proc = run(["docker", "stats", "--no-stream", "--format", "{{.ID}} {{.MemUsage}}", *missing], check=False,
                       timeout=30)
            for line in (proc.stdout or "").splitlines():
                parts = line.split(" ", 1)
                if len(parts) == 2:
                    for cid, service in missing.items():
                        if cid.startswith(parts[0]):
                            self.source = self.source or "docker stats samples"
                            self._record(service, parse_size(parts[1].split("/")[0]))

    def run(self) -> None:
        containers: dict[str, str] = {}
        last_list = 0.0
        while not self._halt.is_set():
            try:
                if time.monotonic() - last_list > 2.0:
                    containers = self.fleet.running_containers()
                    last_list = time.monotonic()
                self.sample_once(containers)
            except Exception:  # noqa: BLE001 - sampling must never break the run
                log.debug("peak sampling failed", exc_info=True)
            self._halt.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=10)
        with self._lock:
            return dict(self.peaks)


# ------------------------------------------------------------------------------------------ the fleet


class Fleet:
    """One compose project of docker/docker-compose.yml: build, up, observe, prove, tear down."""

    def __init__(self, rounds: int = 3, project: str | None = None, image: str | None = None,
                 port: int | None = None, keep_image: bool = False) -> None:
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
        self._built = False
        self._extra_containers: list[str] = []

    # -- plumbing

    def compose(self, *args: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess:
        return run(["docker-compose", "-f", str(COMPOSE_FILE), "-p", self.project, *args], env=self.env,
                   timeout=timeout, check=check)

    def services(self) -> list[str]:
        return self.compose("config", "--services").stdout.split()

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
        return self.container_ids(running_only=True)

    def container_id(self, service: str) -> str:
        ids = [cid for cid, svc in self.container_ids(service).items() if svc == service]
        if len(ids) != 1:
            raise FleetError(f"expected one container for {service}, found {len(ids)}")
        return ids[0]

    def inspect(self, cid: str) -> dict[str, Any]:
        return json.loads(run(["docker", "inspect", cid], timeout=60).stdout)[0]

    def info(self, service: str) -> ContainerInfo:
        data = self.inspect(self.container_id(service))
        state = data["State"]
        bindings = (data["HostConfig"].get("PortBindings") or {}).values()
        return ContainerInfo(service=service, name=data["Name"].lstrip("/"),
                             exit_code=None if state["Running"] else state["ExitCode"],
                             oom_killed=bool(state["OOMKilled"]), restart_count=int(data.get("RestartCount", 0)),
                             running=bool(state["Running"]), mem_limit=int(data["HostConfig"].get("Memory") or 0),
                             user=data["Config"].get("User") or "",
                             mounts=[(m.get("Name") or m.get("Source", ""), m["Destination"], bool(m["RW"]))
                                     for m in data.get("Mounts", [])],
                             ports=[(b.get("HostIp", ""), b.get("HostPort", "")) for bs in bindings for b in bs or ()])

    def logs(self, service: str, stdout_only: bool = False) -> str:
        cid = self.container_id(service)
        proc = subprocess.run(["docker", "logs", cid], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL if stdout_only else subprocess.STDOUT, text=True, timeout=60)
        return proc.stdout

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise FleetError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(interval)

    # -- steps

    def build(self) -> float:
        t0 = time.monotonic()
        run(["docker", "build", "-f", str(DOCKERFILE), "-t", self.image, str(REPO)], env=self.env, timeout=1800)
        self._built = True
        return time.monotonic() - t0

    def check_image(self) -> ImageChecks:
        """The image's promises: both commands answer --help, non-root user, no compilers or pip caches,
        numba's cache writable, the gRPC health probe as HEALTHCHECK."""
        checks = ImageChecks()
        for cmd in ("fedpers-server", "fedpers-client"):
            checks.help_exit[cmd] = run(["docker", "run", "--rm", self.image, cmd, "--help"], check=False).returncode
        script = ('echo "uid=$(id -u)"; '
                  'for c in gcc cc g++ c++ clang; do command -v $c >/dev/null && echo "cc=$c"; done; '
                  'for d in /root/.cache/pip "$HOME/.cache/pip" /tmp/pip-*; do [ -e "$d" ] && echo "cache=$d"; done; '
                  '[ -w "$NUMBA_CACHE_DIR" ] && echo numba=writable; true')
        out = run(["docker", "run", "--rm", self.image, "sh", "-c", script]).stdout.splitlines()
        for line in out:
            key, _, value = line.partition("=")
            if key == "uid":
                checks.uid = int(value)
            elif key == "cc":
                checks.compilers.append(value)
            elif key == "cache":
                checks.pip_caches.append(value)
            elif key == "numba":
                checks.numba_cache_writable = True
        inspect = ["docker", "image", "inspect", "-f", "{{json .Config.Healthcheck}}", self.image]
        health = json.loads(run(inspect).stdout)
        checks.healthcheck = list((health or {}).get("Test") or [])
        return checks

    def rebuild_after_code_change(self, checks: ImageChecks) -> None:
        """Build a copy of the context with one code file edited: the dependency layer must come from
        the cache (legacy builder: 'Using cache'; BuildKit: 'CACHED')."""
        import tempfile

        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
        tag = f"{self.image}-rebuild"
        with tempfile.TemporaryDirectory(prefix="fedpers-ctx-") as tmp:
            ctx = Path(tmp)
            for name in ("pyproject.toml", "README.md", ".dockerignore"):
                shutil.copy2(REPO / name, ctx / name)
            for name in ("common", "client", "server"):
                shutil.copytree(REPO / name, ctx / name, ignore=ignore)
            (ctx / "docker").mkdir()
            for name in ("Dockerfile", "fleet_model.ini", "fleet_data.py"):
                shutil.copy2(REPO / "docker" / name, ctx / "docker" / name)
            with open(ctx / "server" / "__init__.py", "a") as fh:
                fh.write("# a code change\n")
            t0 = time.monotonic()
            out = run(["docker", "build", "-f", str(ctx / "docker" / "Dockerfile"), "-t", tag, str(ctx)], env=self.env,
                      timeout=1800).stdout
            checks.code_rebuild_seconds = time.monotonic() - t0
        run(["docker", "rmi", tag], check=False)
        checks.deps_cached_after_code_change = deps_step_cached(out)

    def image_size(self) -> int:
        return int(run(["docker", "image", "inspect", "-f", "{{.Size}}", self.image]).stdout.strip())

    def up(self) -> None:
        leftovers = self.container_ids()
        if leftovers:
            raise FleetError(f"project {self.project} is not clean: {sorted(set(leftovers.values()))}")
        self.compose("up", "-d", "--no-build", timeout=600)
        from fedpers.tls import TlsConfig  # the CA the one-shot certs step made, to reach the server over TLS

        ca = Path(tempfile.mkdtemp(prefix="fedpers-fleet-ca-")) / "ca.pem"
        run(["docker", "cp", f"{self.container_id('certs')}:/var/lib/fedpers/tls/ca.pem", str(ca)])
        self.tls = TlsConfig(ca=ca)

    def server_health(self) -> str:
        data = self.inspect(self.container_id("server"))
        return ((data["State"].get("Health") or {}).get("Status")) or ""

    def wait_status(self, predicate: Callable[[Any], bool], what: str, timeout: float,
                    seen: list[int] | None = None) -> Any:
        def probe() -> Any:
            status = get_status(self.address, tls=self.tls, admin_token=self.admin_token)
            if status is not None and seen is not None and (not seen or seen[-1] != status.version):
                seen.append(status.version)
            return status if status is not None and predicate(status) else None

        return self.wait_for(what, probe, timeout)

    def restart_server(self, seen: list[int], timeout: float) -> RestartProof:
        """Stop the server (SIGTERM) between rounds 1 and R, start it again on the same volume."""
        before = self.wait_status(lambda s: s.version >= 1 or s.finished, "the first round to close", timeout, seen)
        if before.finished:
            raise FleetError("the federation finished before the server could be restarted; raise --rounds")
        self.compose("stop", "-t", "30", "server", timeout=120)
        down = self.info("server")
        stopped = [int(m) for m in re.findall(r"stopped at version (\d+)", self.logs("server"))]
        devices_up = sorted(c.service for c in (self.info(s) for s in self.device_services()) if c.running)
        time.sleep(3.0)  # let the devices notice: their calls now fail and they back off
        self.compose("start", "server", timeout=120)
        self.wait_for("the restarted server to be healthy", lambda: self.server_health() == "healthy", 120)
        after = self.wait_status(lambda s: True, "GetStatus after the restart", 60, seen)
        return RestartProof(version_before_stop=before.version, stopped_at_version=stopped[-1] if stopped else -1,
                            stop_exit_code=down.exit_code, version_after_start=after.version,
                            devices_running_while_down=devices_up)

    def restart_device(self, proof: RestartProof, service: str, seen: list[int], timeout: float) -> None:
        """SIGTERM one device while a round is open, then start it again on the same state volume."""
        status = self.wait_status(lambda s: s.round_state == "open" or s.finished, "a round to open", timeout, seen)
        if status.finished:
            raise FleetError(f"the federation finished before {service} could be restarted; raise --rounds")
        self.compose("stop", "-t", "60", service, timeout=120)
        proof.device = service
        proof.device_stop_exit_code = self.info(service).exit_code
        proof.device_stop_report = self.device_report(service)
        self.compose("start", service, timeout=120)

    def device_services(self) -> list[str]:
        return [s for s in self.services() if s.startswith("device")]

    def device_report(self, service: str) -> dict[str, Any]:
        """The agent's final JSON report (`--json`: the last JSON line on the container's stdout)."""
        for line in reversed(self.logs(service, stdout_only=True).splitlines()):
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    return json.loads(line)
        return {}

    def limits_enforced(self, limit: int) -> bool:
        """A container that touches twice its memory limit must be OOM-killed where limits work."""
        name = f"{self.project}_probe"
        self._extra_containers.append(name)
        code = ("import sys; n = int(sys.argv[1]); b = bytearray(n); "
                "b[::4096] = b'x' * len(range(0, n, 4096)); print('survived')")
        proc = run(["docker", "run", "--name", name, "-m", str(limit), "--memory-swap", str(limit), self.image,
                    "python", "-c", code, str(2 * limit)], check=False, timeout=120)
        state = self.inspect(name)["State"]
        run(["docker", "rm", "-f", name], check=False)
        return proc.returncode != 0 and bool(state["OOMKilled"])

    def plan_totals(self) -> dict[str, int]:
        """`fedpers-client plan` of the fleet model in the image: naive and swap arena bytes."""
        out = {}
        for mode in ("naive", "planned", "swap"):
            proc = run(["docker", "run", "--rm", self.image, "fedpers-client", "plan", MODEL_IN_IMAGE, "--memory", mode,
                        "--json"], timeout=120)
            out[mode] = int(json.loads(proc.stdout.strip().splitlines()[-1])["totals"]["arena_bytes"])
        return out

    def memory_run(self, mode: str, extra: Sequence[str], sampler: PeakSampler) -> MemoryRun:
        """device-small's container (same mem_limit, same data) once more: one epoch of local training."""
        name = f"{self.project}_{SMALL}_{mode}"
        self._extra_containers.append(name)
        t0 = time.monotonic()
        proc = self.compose("run", "--no-deps", "-T", "--name", name, SMALL, "fedpers-client", "--log-level", "INFO",
                            "train", MODEL_IN_IMAGE,
                            "--data", DATA_IN_CONTAINER, "--epochs", "1", "--swap-dir", STATE_IN_CONTAINER, *extra,
                            timeout=600, check=False)
        seconds = time.monotonic() - t0
        state = self.inspect(name)["State"]
        time.sleep(2 * sampler.interval)
        peak, anon = sampler.peaks.get(name), sampler.anon_peaks.get(name)
        run(["docker", "rm", "-f", name], check=False)
        return MemoryRun(mode=mode, exit_code=state["ExitCode"], oom_killed=bool(state["OOMKilled"]), peak_bytes=peak,
                         seconds=seconds, tail="\n".join((proc.stdout or "").splitlines()[-5:]), anon_bytes=anon)

    def save_logs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for cid, service in self.container_ids().items():
            with contextlib.suppress(Exception):
                proc = subprocess.run(["docker", "logs", "--timestamps", cid], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=60)
                (folder / f"{service}.log").write_text(proc.stdout)

    def teardown(self) -> None:
        """Remove everything this project made; every step is tried even when one fails."""
        steps: list[list[str]] = [
            ["docker-compose", "-f", str(COMPOSE_FILE), "-p", self.project, "down", "-v", "--remove-orphans",
             "-t", "30"],
        ]
        steps += [["docker", "rm", "-f", "-v", name] for name in self._extra_containers]
        if self._built and not self.keep_image:
            # --no-prune keeps the untagged parent layers: the next build reuses the dependency layer.
            steps.append(["docker", "rmi", "--no-prune", self.image])
        for argv in steps:
            with contextlib.suppress(FleetError):
                run(argv, env=self.env, timeout=300, check=False)
        leftovers = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"],
                        check=False).stdout.split()
        volumes = run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}"],
                      check=False).stdout.split()
        if leftovers or volumes:
            log.warning("teardown left %d containers and %d volumes of %s", len(leftovers), len(volumes),
                        self.project)


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


def run_fleet(rounds: int = 3, timeout: float = 600.0, keep_image: bool = False, logs_dir: Path | None = None,
              memory_proof: bool = True) -> FleetResult:
    """The whole scenario; returns what was observed (tests/test_docker.py asserts on it)."""
    t_start = time.monotonic()
    fleet = Fleet(rounds=rounds, keep_image=keep_image)
    result = FleetResult(project=fleet.project, image=fleet.image, rounds_target=rounds)
    result.logs_dir = logs_dir or REPO / "runs" / f"docker-{fleet.project}"
    sampler = PeakSampler(fleet)
    ok = False
    with signals_as_interrupt():
        try:
            log.info("building %s", fleet.image)
            result.build_seconds = fleet.build()
            result.image_size = fleet.image_size()
            log.info("image %s: %s, built in %.0fs", fleet.image, mib(result.image_size), result.build_seconds)
            result.image_checks = fleet.check_image()
            fleet.rebuild_after_code_change(result.image_checks)
            sampler.start()
            fleet.up()
            log.info("fleet %s is up; server on %s", fleet.project, fleet.address)
            seen: list[int] = []
            result.restart = fleet.restart_server(seen, timeout)
            log.info("server restarted: stopped at v%d, continued at v%d", result.restart.stopped_at_version,
                     result.restart.version_after_start)
            fleet.restart_device(result.restart, RESTARTED_DEVICE, seen, timeout)
            log.info("%s stopped (exit %s) and started again", RESTARTED_DEVICE, result.restart.device_stop_exit_code)
            result.status = fleet.wait_status(lambda s: s.finished and s.rounds_completed >= rounds,
                                              f"{rounds} rounds", timeout, seen)
            devices = fleet.device_services()
            fleet.wait_for("every device to exit", lambda: not any(fleet.info(s).running for s in devices), 180)
            result.versions_seen = seen
            fleet.compose("stop", "-t", "30", timeout=120)  # SIGTERM to the (idle) server: must exit 0
            result.containers = {s: fleet.info(s) for s in fleet.services()}
            result.server_final_exit = result.containers["server"].exit_code
            result.server_log = fleet.logs("server")
            result.reports = {s: fleet.device_report(s) for s in devices}
            if memory_proof:
                limit = result.containers[SMALL].mem_limit
                proof = MemoryProof(mem_limit=limit, enforced=False)
                result.memory = proof
                if not limit:
                    proof.reason = f"{SMALL} has no mem_limit in the compose file"
                elif not fleet.limits_enforced(limit):
                    proof.reason = "this Docker host does not enforce container memory limits (probe survived)"
                else:
                    proof.enforced = True
                    proof.plan = fleet.plan_totals()
                    proof.naive = fleet.memory_run("naive", ("--memory", "naive"), sampler)
                    proof.swap = fleet.memory_run("swap", SWAP_ARGS, sampler)
            result.peaks = sampler.stop()
            result.anon_peaks = dict(sampler.anon_peaks)
            result.peak_source = sampler.source
            result.seconds = time.monotonic() - t_start
            ok = True
            return result
        finally:
            if not ok:
                log.error("fleet run failed; container logs in %s", result.logs_dir)
            for step in (sampler.stop, lambda: ok or fleet.save_logs(result.logs_dir), fleet.teardown):
                try:
                    step()
                except Exception:  # noqa: BLE001 - the remaining clean-up steps must still run
                    log.exception("clean-up step failed")


# ------------------------------------------------------------------------------------------ reporting


def device_table(result: FleetResult) -> str:
    """One line per device: rounds joined, bytes up, peak container memory, its limit and exit."""
    head = (f"{'device':<14} {'rounds joined':>13} {'bytes up':>10} {'peak mem':>9} {'anon':>8} {'limit':>9} "
            f"{'memory mode':<24} {'exit':>4} {'OOM':>4}")
    lines = [head, "-" * len(head)]
    for s in result.devices:
        rep, info = result.reports.get(s, {}), result.containers[s]
        mem = rep.get("memory_report") or {}
        mode = mem.get("mode", "-")
        if mem.get("mode") == "swap":
            mode += f" (arena {mib(mem.get('arena_bytes'))})"
        elif mem:
            mode += f" (arena {mib(mem.get('arena_bytes'))})"
        lines.append(f"{s:<14} {rep.get('rounds_trained', 0):>13} {rep.get('bytes_up', 0):>10,} "
                     f"{mib(result.peaks.get(s)):>9} {mib(result.anon_peaks.get(s)):>8} "
                     f"{mib(info.mem_limit) if info.mem_limit else 'none':>9} {mode:<24} {info.exit_code!s:>4} "
                     f"{'yes' if info.oom_killed else 'no':>4}")
    return "\n".join(lines)


def summary(result: FleetResult) -> str:
    out = [f"project {result.project}: image {mib(result.image_size)} (built in {result.build_seconds:.0f}s), "
           f"whole run {result.seconds:.0f}s"]
    if result.image_checks:
        c = result.image_checks
        out.append(f"image: --help exits {c.help_exit}, uid {c.uid}, compilers {c.compilers or 'none'}, pip caches "
                   f"{c.pip_caches or 'none'}, numba cache writable {c.numba_cache_writable}; rebuild after a code "
                   f"change reused the dependency layer: {c.deps_cached_after_code_change} "
                   f"({c.code_rebuild_seconds:.0f}s)")
    if result.status is not None:
        out.append(f"server: version {result.status.version}, {result.status.rounds_completed}/"
                   f"{result.status.rounds_target} rounds, versions seen {result.versions_seen}, "
                   f"exit after SIGTERM {result.server_final_exit}")
    if result.restart:
        r = result.restart
        out.append(f"restart: stopped at v{r.stopped_at_version} (exit {r.stop_exit_code}), continued at "
                   f"v{r.version_after_start}; devices up while it was down: {len(r.devices_running_while_down)}; "
                   f"{r.device} stopped mid-round (exit {r.device_stop_exit_code}, "
                   f"{r.device_stop_report.get('reason')!r}) and rejoined")
    out.append(device_table(result))
    out.append(f"(peak mem: {result.peak_source or 'not sampled'}, page cache included; anon: peak anonymous memory)")
    m = result.memory
    if m is not None:
        if not m.enforced:
            out.append(f"memory proof skipped: {m.reason}")
        else:
            plan = ", ".join(f"{k} {mib(v)}" for k, v in m.plan.items())
            out.append(f"memory proof under {SMALL}'s mem_limit {mib(m.mem_limit)} (plan arenas: {plan}):")
            for r in (m.naive, m.swap):
                if r is not None:
                    out.append(f"  {r.mode:<6} exit {r.exit_code}  OOMKilled {r.oom_killed}  peak {mib(r.peak_bytes)}  "
                               f"anon {mib(r.anon_bytes)}  {r.seconds:.0f}s")
    return "\n".join(out)


def probe_limits(limits: Sequence[str], keep_image: bool = False) -> list[tuple[str, str, int, bool]]:
    """One epoch of device-small's training (its data from the compose data step) per mode and
    container limit: (mode, limit, exit code, OOM-killed). How docker/README.md's limits were found."""
    fleet = Fleet(keep_image=keep_image)
    rows = []
    with signals_as_interrupt():
        try:
            fleet.build()
            fleet.compose("up", "--no-build", "data", timeout=300)
            volume = f"{fleet.project}_{SMALL}-data"
            for mode, extra in (("naive", ("--memory", "naive")), ("swap", SWAP_ARGS)):
                for limit in limits:
                    name = f"{fleet.project}_{mode}_{limit}"
                    fleet._extra_containers.append(name)
                    run(["docker", "run", "--name", name, "-m", limit, "--memory-swap", limit,
                         "-v", f"{volume}:/var/lib/fedpers/data:ro", fleet.image, "fedpers-client", "train",
                         MODEL_IN_IMAGE, "--data", DATA_IN_CONTAINER, "--epochs", "1", "--swap-dir", "/tmp", *extra],
                        check=False, timeout=600)
                    state = fleet.inspect(name)["State"]
                    rows.append((mode, limit, int(state["ExitCode"]), bool(state["OOMKilled"])))
                    run(["docker", "rm", "-f", name], check=False)
                    print(f"{mode:<6} under {limit:>6}: exit {rows[-1][2]:>3}  OOM-killed {rows[-1][3]}", flush=True)
        finally:
            fleet.teardown()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="docker/fleet.py", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the rounds (default 600)")
    p.add_argument("--keep-image", action="store_true", help="do not remove the image tag at the end")
    p.add_argument("--no-memory-proof", action="store_true", help="skip the naive/swap runs of device-small")
    p.add_argument("--logs", type=Path, default=None, help="where container logs go (default runs/docker-<project>)")
    p.add_argument("--limits", default=None, metavar="L1,L2,...",
                   help="instead of the fleet: train device-small's model naive and swap under each limit")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reason = docker_available()
    if reason:
        print(f"fleet: {reason}", file=sys.stderr)
        return 2
    if args.limits:
        try:
            probe_limits([x.strip() for x in args.limits.split(",") if x.strip()], args.keep_image)
        except (FleetError, KeyboardInterrupt) as exc:
            print(f"fleet: {exc or 'interrupted'}", file=sys.stderr)
            return 1
        return 0
    try:
        result = run_fleet(args.rounds, args.timeout, args.keep_image, args.logs, not args.no_memory_proof)
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fleet: interrupted; torn down", file=sys.stderr)
        return 130
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
