"""`fedpers-sim --engine ray`: thousands of virtual devices on a small pool of Ray actors, one real server.

Where each part runs:
- the driver (this module, in the `fedpers-sim` process): writes the data, starts `fedpers-server` as
  a child process (TLS with the run's throwaway CA, tokens in its environment, as the process engine
  does), starts Ray (a private local instance by default, or joins `--ray-address`), follows GetStatus
  and schedules the devices onto the actors;
- each actor is a `DeviceHost` (`device_host.py`) in a Ray worker process: it advances the devices the
  driver hands it one task at a time through the real agent, over real gRPC to the server;
- each device's state (secret, personal layers, residuals, history, report) is its own directory
  `work/devices/<i>/`, exactly what `fedpers-client run --state` keeps, so any actor can take the next step.

Scheduling: every device has an actor it normally runs on and a time of its next step. A device that
was told to WAIT is polled again after `keepalive` seconds (well inside the server's `--waiting-ttl`,
so it stays selectable while it sits in no actor); when GetStatus shows a new round open, every device
is due at once (a sweep), so the selected ones find their TRAIN within one pass over the fleet; a
device that just trained asks again after the server's retry hint, to wait for the next round. When
the federation is finished, a last sweep gives every device its DONE (final evaluation and
personalization, report). An actor that dies hands its devices to the others: they join again with
the secret in their state directory and continue from their state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import secrets
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedpers.client import sim_report
from fedpers.client.baseline import LocalOnlyResult
from fedpers.client.data_plan import plan_for, write_plan
from fedpers.client.device_host import BaselineJob, DeviceHost, DeviceOrder, HostConfig, Outcome, StepReport
from fedpers.client.memwatch import TreeMemory, TreePeak, peak_rss_of
from fedpers.client.processes import CHILD_ENV, Child, wait_for_server
from fedpers.client.sim import (
    SimConfig,
    SimError,
    SimInterrupted,
    SimSecrets,
    SimTls,
    StatusPoll,
    default_report_dir,
    digits_fit,
    server_argv,
)
from fedpers.client.sim_report import SimReport

log = logging.getLogger("fedpers.sim.ray")

# Local Ray stays on this machine: no usage statistics, and the node address is the loopback (Ray then
# binds its own gRPC servers to 127.0.0.1 instead of every interface; checked after start).
RAY_LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
OBJECT_STORE_BYTES = 100 * 2**20  # the driver and actors pass small records: Ray's minimum is ~75 MiB
STATUS_INTERVAL = 0.3  # seconds between the driver's GetStatus polls
BASELINE_LIMIT = 1000  # local-only baselines for at most this many (a seeded sample of the) participants
TABLE_ROWS = 40  # device rows printed; report.json has all


class RayEngineError(SimError):
    """The Ray engine cannot run (Ray missing, no actor left, Ray not local); the message says which."""


@dataclass(frozen=True)
class RayConfig:
    """How the Ray engine runs: where Ray is, how many actors, how devices are handed to them."""

    address: str | None = None  # None: a private local Ray for this run; else an existing cluster
    actors: int = 2
    batch: int = 16  # devices per call to an actor: small, so a new round's sweep starts quickly
    waiting_ttl: float | None = None  # the server's --waiting-ttl; None: 3 x round_timeout
    keepalive: float | None = None  # seconds between a waiting device's polls; None: waiting_ttl / 3

    def __post_init__(self) -> None:
        if self.actors < 1 or self.batch < 1:
            raise ValueError(f"ray actors and batch must be >= 1, got {self.actors}, {self.batch}")

    def ttl(self, cfg: SimConfig) -> float:
        return self.waiting_ttl or 3 * cfg.round_timeout

    def keepalive_for(self, cfg: SimConfig) -> float:
        return self.keepalive or self.ttl(cfg) / 3


def default_min_devices(cfg: SimConfig) -> int:
    """Without --min-devices: all of a round's sample but one (all devices but one when fraction is 1,
    the process engine's default)."""
    return cfg.min_devices or max(1, math.ceil(cfg.fraction * cfg.devices) - 1)


# ----------------------------------------------------------------------------- Ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a plain `HOST:PORT` cluster address; None for Ray's other forms (`ray://`, `auto`)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _is_loopback(address: str) -> bool:
    hp = _host_port(address)
    if hp is None:
        return False
    try:
        return ipaddress.ip_address(hp[0]).is_loopback
    except ValueError:
        return hp[0] == "localhost"


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """RayEngineError when nothing listens at a `HOST:PORT` cluster address (ray.init would wait for it
    without end)."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as exc:
        raise RayEngineError(f"--ray-address {address}: no Ray cluster answers there ({exc}); start one with "
                             f"`ray start --head --port {hp[1]}` or leave --ray-address out for a local Ray") from None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayEngineError("the ray engine needs Ray: pip install 'fedpers[ray]'") from None
    return ray


@functools.cache
def _ray_token() -> str:
    """The token of this process's local Ray instances: one per process, because Ray's driver side keeps
    the first token it reads for the life of the process."""
    return secrets.token_urlsafe(32)


@contextlib.contextmanager
def ray_session(rc: RayConfig, worker_env: dict[str, str] | None = None,
                temp_root: Path | None = None) -> Iterator[Any]:
    """Ray for one run: a private local instance (loopback only, no usage stats, no dashboard, a random
    auth token for the process, its files in a temp dir removed afterwards) or the cluster at
    `rc.address`; shut down (the local one's processes end) and the environment restored on the way out.
    `worker_env` (the enrollment token, thread counts) is put in this process's environment for a local
    instance, whose processes inherit it (a cluster's actors get it through `runtime_env` instead)."""
    worker_env = worker_env or {}
    saved = {k: os.environ.get(k) for k in (*RAY_LOCAL_ENV, "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", *worker_env)}
    temp: str | None = None
    ray = None
    try:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        if rc.address is None or _is_loopback(rc.address):  # a loopback cluster: Ray would dial eth0's address
            os.environ.update(RAY_LOCAL_ENV)
            os.environ["RAY_AUTH_TOKEN"] = _ray_token()  # Ray turns token auth on; nothing written to ~/.ray
            os.environ.update(worker_env)  # the raylet and its workers inherit it: no runtime_env, no extra workers
        if rc.address is not None:
            _check_reachable(rc.address)
        ray = _import_ray()
        if rc.address is None:
            temp = tempfile.mkdtemp(prefix="fedpers-ray-", dir=temp_root)  # short: Ray's socket paths
            ray.init(address="local", num_cpus=max(rc.actors, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False, configure_logging=False, object_store_memory=OBJECT_STORE_BYTES,
                     _temp_dir=temp)
            ip = ray.util.get_node_ip_address()
            if ip not in ("127.0.0.1", "::1"):
                raise RayEngineError(f"local Ray came up on {ip}, not the loopback: refusing to serve beyond this "
                                     "machine (ray was imported before; set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
                                     "before importing it)")
        else:
            ray.init(address=rc.address, log_to_driver=False, configure_logging=False)
        log.info("ray: %s, %s", "local" if rc.address is None else rc.address, ray.cluster_resources())
        yield ray
    finally:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


# ----------------------------------------------------------------------------- scheduling


@dataclass
class _Device:
    """The driver's view of one virtual device."""

    order: DeviceOrder
    actor: int
    ticket: int = 0  # the heap entry that is current (older ones are skipped)
    busy: bool = False
    joined: bool = False  # has had a session on its actor
    last_step: float = 0.0  # when its last step came back (monotonic): sweeps go oldest first
    done: bool = False
    lost: bool = False
    trained_on: set[str] = field(default_factory=set)


@dataclass
class _Batch:
    actor: int
    indices: list[int]
    sweep: int  # the sweep counter when it was sent
    join: bool = False  # a batch of the fleet's first joins


@dataclass
class EngineStats:
    """What the engine did, beside the SimReport (`engine.json`)."""

    data: str
    actors: int
    ray: str
    steps: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    joins: int = 0
    moves: int = 0
    sweeps: int = 0
    fleet_online_seconds: float | None = None  # from the start until every device had enrolled and joined
    lost: list[int] = field(default_factory=list)
    devices_trained_on_several_actors: int = 0
    baselines: str = ""
    rounds_per_minute: float | None = None
    rounds_seconds: float | None = None
    elapsed_seconds: float = 0.0
    server_peak_rss_bytes: int | None = None
    run_peak_rss_bytes: int | None = None
    run_peak_pss_bytes: int | None = None
    run_peak_processes: int | None = None
    hosts: list[dict[str, Any]] = field(default_factory=list)


class Scheduler:
    """Hands due devices to idle actors, a batch at a time, and reschedules them by what happened."""

    def __init__(self, ray: Any, actors: list[Any], devices: list[_Device], batch: int, keepalive: float,
                 retry_after: float, stats: EngineStats, seed: int = 0) -> None:
        self.ray, self.actors, self.devices = ray, actors, devices
        self.joining = True  # the fleet first enrolls and joins; then the first sweep, in random order
        self.online_at: float | None = None
        self._rng = random.Random(seed)
        self.batch, self.keepalive, self.retry_after = batch, keepalive, retry_after
        self.stats = stats
        self.alive = [True] * len(actors)
        self.heaps: list[list[tuple[int, float, int, int]]] = [[] for _ in actors]  # (priority, due, ticket, index)
        self.forget: list[list[int]] = [[] for _ in actors]
        self.inflight: dict[Any, _Batch] = {}
        self.sweep_count = 0
        self._tickets = itertools.count(1)
        self.steps: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        for d in devices:
            self.schedule(d, 0.0, priority=1)

    # -- queue

    def schedule(self, d: _Device, due: float, priority: int = 1) -> None:
        d.ticket = next(self._tickets)
        heapq.heappush(self.heaps[d.actor], (priority, due, d.ticket, d.order.index))

    def sweep(self, shuffle: bool = False) -> None:
        """Make every idle device due at once, ahead of the rest, the one that stepped longest ago first
        (a new round: find the selected devices; the end: hand out DONE); `shuffle`: in random order
        (the first sweep, when the fleet has just joined)."""
        self.sweep_count += 1
        self.stats.sweeps += 1
        for d in self.devices:
            if not (d.busy or d.done or d.lost):
                self.schedule(d, self._rng.random() if shuffle else d.last_step, priority=0)

    def _take(self, actor: int, now: float) -> list[int]:
        heap, out = self.heaps[actor], []
        while heap and len(out) < self.batch:
            priority, due, ticket, index = heap[0]
            d = self.devices[index]
            if ticket != d.ticket or d.busy or d.done or d.lost or d.actor != actor:
                heapq.heappop(heap)  # stale entry
                continue
            if due > now:
                break
            heapq.heappop(heap)
            out.append(index)
        return out

    # -- calls

    def dispatch(self, now: float) -> None:
        """Send each idle live actor its next batch of due devices."""
        busy = {b.actor for b in self.inflight.values()}
        for a, actor in enumerate(self.actors):
            if not self.alive[a] or a in busy:
                continue
            indices = self._take(a, now)
            if not indices:
                continue
            for i in indices:
                self.devices[i].busy = True
            forget, self.forget[a] = self.forget[a], []
            orders = [self.devices[i].order for i in indices]
            ref = actor.join.remote(orders) if self.joining else actor.advance.remote(orders, forget)
            self.inflight[ref] = _Batch(a, indices, self.sweep_count, join=self.joining)

    def collect(self, timeout: float) -> None:
        """Wait up to `timeout` s for batches to come back and handle what happened to their devices."""
        if not self.inflight:
            time.sleep(timeout)
            return
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        for ref in ready:
            batch = self.inflight.pop(ref)
            try:
                reports: list[StepReport] = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:
                self._actor_lost(batch, exc)
                continue
            now = time.monotonic()
            for rep in reports:
                self._handle(rep, batch, now)
        if self.joining and not self.inflight and all(d.joined or d.lost for d in self.devices):
            self.joining, self.online_at = False, time.monotonic()
            self.sweep(shuffle=True)  # the fleet is online: everyone asks for a task, in random order

    def _handle(self, rep: StepReport, batch: _Batch, now: float) -> None:
        d = self.devices[rep.index]
        d.busy, d.last_step = False, now
        self.steps[rep.outcome.value] += 1
        if rep.joined:
            self.stats.joins += 1
            d.joined = True
        if rep.outcome is Outcome.JOINED:
            pass  # waits for the sweep that starts once the whole fleet has joined
        elif rep.outcome is Outcome.DONE:
            d.done = True
        elif rep.outcome is Outcome.FAILED:
            d.lost = True
            self.stats.lost.append(rep.index)
            log.warning("device %d lost on %s: %s", rep.index, rep.host, rep.error)
        elif rep.outcome is Outcome.WAIT:
            if batch.sweep < self.sweep_count:  # polled before the latest round opened: ask again now
                self.schedule(d, now, priority=0)
            else:
                self.schedule(d, now + max(rep.wait, self.keepalive))
        elif rep.outcome in (Outcome.TRAINED, Outcome.REFUSED):
            if rep.outcome is Outcome.TRAINED:
                d.trained_on.add(rep.host)
            self.schedule(d, now + (rep.wait or self.retry_after))  # back to waiting for the next round
        elif rep.outcome is Outcome.RETRY:
            self.refusals[rep.refusal] += 1
            self.schedule(d, now + rep.wait, priority=0)

    def _actor_lost(self, batch: _Batch, exc: BaseException) -> None:
        """An actor died: its devices go to the live actors, where they join again from their state."""
        a = batch.actor
        self.alive[a] = False
        live = [k for k, ok in enumerate(self.alive) if ok]
        log.warning("actor %d died (%s); moving its devices to actors %s", a, type(exc).__name__, live)
        if not live:
            raise RayEngineError(f"every actor died; the last: {exc}")
        now = time.monotonic()
        targets = itertools.cycle(live)
        for d in self.devices:
            if d.actor != a:
                continue
            d.busy = False
            d.actor = next(targets)
            self.stats.moves += 1
            if not (d.done or d.lost):
                self.schedule(d, now, priority=0)  # while the fleet joins: it joins on its new actor

    @property
    def finished(self) -> bool:
        return all(d.done or d.lost for d in self.devices) and not self.inflight


# ----------------------------------------------------------------------------- the run


@dataclass
class _Follow:
    """What the driver has seen of the server."""

    say: Callable[..., None]
    rounds: int
    t_start: float
    status: Any = None
    shown: int = 0
    last_round: int = 0
    finished_seen: bool = False
    t_first_round: float | None = None
    t_finished: float | None = None

    def show(self) -> None:
        rows = sim_report.round_rows(self.status)
        for row in rows[self.shown:]:
            self.say(sim_report.format_round(row, self.rounds, time.monotonic() - self.t_start), flush=True)
        self.shown = max(self.shown, len(rows))


def simulate_ray(cfg: SimConfig, rc: RayConfig = RayConfig()) -> SimReport:
    """The whole run on Ray; returns the SimReport (also report_dir/report.json, and engine.json with
    what the engine did and the run's memory). On Ctrl-C or the timeout the report of what finished is
    written and SimInterrupted carries it."""
    t_start = time.monotonic()
    report_dir = Path(cfg.report_dir) if cfg.report_dir else default_report_dir()
    cfg = replace(cfg, report_dir=report_dir, min_devices=default_min_devices(cfg))
    report_dir.mkdir(parents=True, exist_ok=True)
    work = report_dir / "work"
    if work.exists():
        shutil.rmtree(work)
    say = (lambda *a, **k: None) if cfg.quiet else print
    alpha = 0.5 if cfg.alpha is None else cfg.alpha
    plan = plan_for(cfg.devices, alpha)
    say(f"fedpers-sim (ray engine): {cfg.devices} devices on {rc.actors} actors "
        f"({'local Ray' if rc.address is None else 'Ray at ' + rc.address}), {cfg.rounds} rounds, fraction "
        f"{cfg.fraction}, min-devices {cfg.min_devices}, codec {cfg.codec}, {cfg.local_epochs} local epoch(s) "
        f"-> {report_dir}")
    say(plan.describe(), flush=True)
    memory = TreeMemory().start()
    data_paths = write_plan(plan, work / "data", cfg.seed, alpha, digits_fit(Path(cfg.model)))
    stats = EngineStats(data=plan.describe(), actors=rc.actors, ray=rc.address or "local")
    follow = _Follow(say, cfg.rounds, t_start)
    secrets_ = SimSecrets()
    server: Child | None = None
    ended = "finished"
    baselines: list[LocalOnlyResult | None] = [None] * cfg.devices
    try:
        with ray_session(rc, {**CHILD_ENV, **secrets_.device_env()}) as ray:
            host_ip = "127.0.0.1" if rc.address is None else ray.util.get_node_ip_address()
            tls = _tls(cfg, work / "tls", host_ip)
            server, address = _start_server(cfg, rc, work, tls, secrets_, host_ip)
            actors = _start_actors(ray, cfg, rc, work, tls, address, secrets_)
            devices = [_Device(DeviceOrder(i, f"sim-device-{i}", str(data_paths[i]), str(work / "devices" / str(i))),
                               actor=i % rc.actors) for i in range(cfg.devices)]
            sched = Scheduler(ray, actors, devices, rc.batch, rc.keepalive_for(cfg), retry_after=0.5, stats=stats,
                              seed=cfg.seed)
            try:
                _drive(cfg, sched, follow, server, address, tls, secrets_)
                stats.server_peak_rss_bytes = peak_rss_of(server.proc.pid)
                baselines = _baselines(ray, actors, sched, cfg, work, stats, say)
            except KeyboardInterrupt:
                ended = "interrupted"
            except TimeoutError as exc:
                ended = "timeout"
                log.warning("%s", exc)
            finally:
                stats.steps, stats.refusals = dict(sched.steps), dict(sched.refusals)
                if sched.online_at is not None:
                    stats.fleet_online_seconds = round(sched.online_at - t_start, 2)
                stats.devices_trained_on_several_actors = sum(len(d.trained_on) > 1 for d in devices)
                stats.hosts = _host_stats(ray, actors, sched)
                for actor in actors:
                    with contextlib.suppress(Exception):  # already dead actors included
                        ray.kill(actor)
            if stats.server_peak_rss_bytes is None and server is not None:
                stats.server_peak_rss_bytes = peak_rss_of(server.proc.pid)
    finally:
        if server is not None:
            server.stop()
        peak: TreePeak = memory.stop()
    stats.run_peak_rss_bytes, stats.run_peak_pss_bytes = peak.rss_bytes, peak.pss_bytes
    stats.run_peak_processes = peak.processes
    if follow.t_first_round is not None and follow.t_finished is not None and follow.t_finished > follow.t_first_round:
        stats.rounds_seconds = round(follow.t_finished - follow.t_first_round, 2)
        stats.rounds_per_minute = round(60 * cfg.rounds / stats.rounds_seconds, 2)
    stats.elapsed_seconds = round(time.monotonic() - t_start, 2)
    return _write_report(cfg, rc, work, follow, baselines, stats, ended, say)


def _tls(cfg: SimConfig, directory: Path, host_ip: str) -> SimTls:
    """The run's throwaway PKI (its server certificate also names `host_ip`, where cluster actors dial)."""
    if cfg.insecure:
        return SimTls()
    from fedpers.pki import DEFAULT_SERVER_NAMES, make_dev_pki

    names = DEFAULT_SERVER_NAMES + ((host_ip,) if host_ip not in DEFAULT_SERVER_NAMES else ())
    pki = make_dev_pki(directory, server_names=names)
    return SimTls(pki.ca_cert, pki.server_cert, pki.server_key)


def _start_server(cfg: SimConfig, rc: RayConfig, work: Path, tls: SimTls, secrets_: SimSecrets,
                  host_ip: str) -> tuple[Child, str]:
    """fedpers-server as for the process engine, plus what a fleet of this size needs: room for every
    device (--max-devices) and a liveness window longer than a device's time between polls."""
    port_file = work / "server.port"
    argv = server_argv(cfg, port_file, work / "store", tls) + [
        "--max-devices", str(cfg.devices), "--waiting-ttl", str(rc.ttl(cfg)), "--listen", f"{host_ip}:0"]
    server = Child.start("server", argv, work / "logs" / "server.log", env=secrets_.server_env())
    address = wait_for_server(port_file, server, timeout=60, tls=tls.client())
    return server, f"{host_ip}:{address.rsplit(':', 1)[1]}"


def _start_actors(ray: Any, cfg: SimConfig, rc: RayConfig, work: Path, tls: SimTls, address: str,
                  secrets_: SimSecrets) -> list[Any]:
    """The pool: one DeviceHost per actor (one CPU each), the enrollment token in its environment (a local
    Ray's workers inherit it from ray_session; on a cluster it goes in the actor's runtime_env)."""
    host_cls = ray.remote(DeviceHost)
    options: dict[str, Any] = {"num_cpus": 1, "max_restarts": 0}
    if rc.address is not None:
        options["runtime_env"] = {"env_vars": {**CHILD_ENV, **secrets_.device_env()}}
    actors = []
    for k in range(rc.actors):
        hc = HostConfig(server=address, ca=str(tls.ca) if tls.ca else None, memory=cfg.memory,
                        memory_budget=cfg.memory_budget, local_epochs=cfg.local_epochs,
                        log_file=str(work / "logs" / f"actor-{k}.log"))
        actors.append(host_cls.options(**options).remote(hc, f"actor-{k}"))
    return actors


def _drive(cfg: SimConfig, sched: Scheduler, follow: _Follow, server: Child, address: str, tls: SimTls,
           secrets_: SimSecrets) -> None:
    """Follow the rounds through GetStatus and keep the actors busy until every device is done or lost."""
    from fedpers.stub import FederationClient

    deadline = follow.t_start + cfg.timeout
    next_status = 0.0
    with FederationClient(address, tls=tls.client(), timeout=5.0, admin_token=secrets_.admin_token) as client:
        poll = StatusPoll(client)
        while not sched.finished:
            now = time.monotonic()
            if now >= next_status and not follow.finished_seen:
                next_status = now + STATUS_INTERVAL
                server.check_alive()
                follow.status = poll() or follow.status
                _on_status(follow, sched, now)
            alive = sum(not d.lost for d in sched.devices)
            if alive < cfg.min_devices_or_default:
                raise SimError(f"only {alive} devices are left, fewer than min-devices "
                               f"({cfg.min_devices_or_default}): {sorted(sched.stats.lost)[:20]} were lost")
            if now > deadline:
                raise TimeoutError(f"the simulation did not finish within {cfg.timeout:.0f}s")
            sched.dispatch(now)
            sched.collect(timeout=0.05)


def _on_status(follow: _Follow, sched: Scheduler, now: float) -> None:
    status = follow.status
    if status is None:
        return
    follow.show()
    if status.current_round and follow.t_first_round is None:
        follow.t_first_round = now
    if status.current_round > follow.last_round and status.round_state == "open":
        follow.last_round = status.current_round
        sched.sweep()  # the selected devices are somewhere in the fleet: poll everyone now
    if status.finished and not follow.finished_seen:
        follow.finished_seen, follow.t_finished = True, now
        sched.sweep()  # everyone gets DONE: final evaluation, personalization, report


def _baselines(ray: Any, actors: list[Any], sched: Scheduler, cfg: SimConfig, work: Path, stats: EngineStats,
               say: Callable[..., None]) -> list[LocalOnlyResult | None]:
    """Local-only baselines in the actors, for the devices that took part in a round (the others have
    no personalized model to compare with); a seeded sample of BASELINE_LIMIT when more took part."""
    from fedpers.client.report import read_report

    jobs = []
    for d in sched.devices:
        rep = read_report(Path(d.order.state) / "report.json")
        if rep is not None and rep.rounds_trained > 0:
            jobs.append(BaselineJob(d.order.index, d.order.data, rep.total_epochs, cfg.seed + d.order.index))
    took_part = len(jobs)
    if len(jobs) > BASELINE_LIMIT:
        jobs = sorted(random.Random(cfg.seed).sample(jobs, BASELINE_LIMIT), key=lambda j: j.index)
    stats.baselines = (f"local-only baselines: {len(jobs)} of the {took_part} devices that took part in a round"
                       + (f" (a seeded sample of {BASELINE_LIMIT})" if took_part > BASELINE_LIMIT else "")
                       + "; devices never selected have no personalized model to compare with")
    say(stats.baselines + ", trained in the actors...", flush=True)
    live = [a for a, ok in zip(actors, sched.alive, strict=True) if ok]
    chunks = [jobs[k::len(live)] for k in range(len(live))]
    results = ray.get([a.local_only.remote(c, str(Path(cfg.model).resolve()), cfg.memory)
                       for a, c in zip(live, chunks, strict=True)])
    out: list[LocalOnlyResult | None] = [None] * cfg.devices
    for chunk, res in zip(chunks, results, strict=True):
        for job, r in zip(chunk, res, strict=True):
            out[job.index] = r
    return out


def _host_stats(ray: Any, actors: list[Any], sched: Scheduler) -> list[dict[str, Any]]:
    out = []
    for a, actor in enumerate(actors):
        if not sched.alive[a]:
            out.append({"host": f"actor-{a}", "died": True})
            continue
        try:
            out.append(dataclasses.asdict(ray.get(actor.stats.remote(), timeout=30)))
        except Exception as exc:  # noqa: BLE001 - statistics only: a host that cannot answer is noted
            out.append({"host": f"actor-{a}", "error": f"{type(exc).__name__}: {exc}"[:200]})
    return out


def _write_report(cfg: SimConfig, rc: RayConfig, work: Path, follow: _Follow,
                  baselines: list[LocalOnlyResult | None], stats: EngineStats, ended: str,
                  say: Callable[..., None]) -> SimReport:
    """report.json (the process engine's SimReport), engine.json, accuracy.png, and the printed summary."""
    from fedpers.client.report import read_report
    from fedpers.store import atomic_write_bytes

    report_dir = Path(cfg.report_dir)  # type: ignore[arg-type]
    reports = [read_report(work / "devices" / str(i) / "report.json") for i in range(cfg.devices)]
    rows = sim_report.device_rows(reports, baselines)
    rounds = sim_report.round_rows(follow.status)
    config = cfg.as_json() | {"engine": "ray", "ray": dataclasses.asdict(rc)}
    report = SimReport(config=config, rounds=rounds, devices=rows,
                       summary=sim_report.summarize(rows, follow.status, time.monotonic() - follow.t_start),
                       ended=ended)
    report.notes["peak_rss_bytes"] = ("ray engine: the peak RSS of the actor process that last ran the device "
                                      "(shared by every device it ran); the run's memory is in engine.json")
    atomic_write_bytes(report_dir / "report.json", (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    atomic_write_bytes(report_dir / "engine.json", (json.dumps(dataclasses.asdict(stats), indent=2) + "\n").encode())
    plotted = sim_report.plot_accuracy(report_dir / "accuracy.png", rounds, rows)
    say("")
    table = sim_report.format_table(rows[:TABLE_ROWS])
    if len(rows) > TABLE_ROWS:
        table += f"\n(the first {TABLE_ROWS} devices; all {len(rows)} in report.json) over all: {_means(rows)}"
    say(table)
    say(f"\nengine: fleet online (enrolled and joined) after {stats.fleet_online_seconds}s; "
        f"{stats.steps.get('trained', 0)} trainings, {sum(stats.steps.values())} steps, "
        f"{stats.joins} sessions opened, {stats.moves} devices moved, {len(stats.lost)} lost, "
        f"refusals {stats.refusals or 'none'}; rounds/min {stats.rounds_per_minute}; run peak "
        f"{(stats.run_peak_pss_bytes or 0) / 2**20:.0f} MiB PSS / {(stats.run_peak_rss_bytes or 0) / 2**20:.0f} MiB "
        f"RSS over {stats.run_peak_processes} processes; server peak RSS "
        f"{(stats.server_peak_rss_bytes or 0) / 2**20:.0f} MiB")
    say(f"report: {report_dir / 'report.json'}  engine: {report_dir / 'engine.json'}"
        + (f"  plot: {report_dir / 'accuracy.png'}" if plotted else ""))
    say(f"{ended} in {stats.elapsed_seconds:.1f}s")
    if not cfg.keep_work:
        shutil.rmtree(work / "data", ignore_errors=True)
        shutil.rmtree(work / "tls", ignore_errors=True)
    if ended != "finished":
        raise SimInterrupted(f"the simulation was {'interrupted' if ended == 'interrupted' else 'timed out'} after "
                             f"{len(rounds)} of {cfg.rounds} rounds; report: {report_dir / 'report.json'}", report)
    return report


def _means(rows: list[sim_report.DeviceRow]) -> str:
    """The table's mean line over every device, in one line."""
    return "  ".join(f"{label} {sim_report.fmt_pct(sim_report.weighted_mean(rows, key)).strip()}%" for label, key in
                     (("global", "global_accuracy"), ("personalized", "personalized_accuracy"),
                      ("local-only", "local_only_accuracy")))
