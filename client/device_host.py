"""A host of virtual devices: one process that advances many devices, one task at a time each.

The Ray engine (`ray_engine.py`) runs one `DeviceHost` per actor; tests use it as a plain object. Each
virtual device is the real device agent (`Agent.step`) with its own `--state` directory, data file,
identity, session and rate limits; the host only lends it a process and a connection:

- one gRPC channel to the server (TLS as configured) shared by all its devices, each calling through
  its own `FederationClient.sibling()` with its own session (one connection per host, not per device);
- a WAIT costs one GetTask on the device's own session; only a device that has work (TRAIN, DONE) or
  no session yet gets an `Agent`, built from its state directory and closed after the step, so the
  host holds no device's tensors between steps and the kernel modules it has loaded serve them all;
- a device that comes here from another host has no session here: it joins with the secret in its
  state directory and continues from its state, exactly like a device process restarted.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from fedpers import wire
from fedpers.client.agent import RETRYABLE, Agent, AgentConfig, StepKind
from fedpers.client.baseline import LocalOnlyResult, local_only
from fedpers.client.report import read_report, write_report
from fedpers.nn.modes import DEFAULT_MEMORY_MODE
from fedpers.stub import FederationClient
from fedpers.tls import TlsConfig

log = logging.getLogger(__name__)

ENV_ENROLL_TOKEN = "FEDPERS_ENROLL_TOKEN"  # as for `fedpers-client run`: secrets come in the environment
POLL_TIMEOUT = 30.0  # seconds a host waits for one GetTask
UNAVAILABLE_WAIT = 1.0  # seconds before a device whose poll found the server unavailable asks again


class Outcome(enum.Enum):
    """What one device's step on a host came to."""

    JOINED = "joined"  # enrolled if it had to, joined: a session here, no task asked for yet
    WAIT = "wait"  # nothing to do: ask again after `wait` seconds (or later)
    TRAINED = "trained"  # trained, update accepted
    REFUSED = "refused"  # trained, update not taken (its round had closed, ...)
    DONE = "done"  # federation finished; final evaluation and personalization done, report written
    RETRY = "retry"  # the call was refused for now (rate limit, server busy or unreachable): ask after `wait`
    FAILED = "failed"  # the device cannot go on (its error in `error`): a lost device


@dataclass(frozen=True)
class HostConfig:
    """What every device on a host shares: where the server is, how to trust it, how to train."""

    server: str
    ca: str | None  # the CA certificate file; None: plaintext (the simulator's --insecure)
    memory: str = DEFAULT_MEMORY_MODE
    memory_budget: str | None = None
    local_epochs: int | None = None  # as the server's: the final personalization of a fresh Agent uses it
    retry_seconds: float = 60.0  # how long an agent keeps retrying an unreachable server
    log_file: str | None = None  # the host's log (devices' and agents' lines); None: leave logging alone


@dataclass(frozen=True)
class DeviceOrder:
    """One virtual device, as the driver names it to a host."""

    index: int
    name: str
    data: str
    state: str


@dataclass(frozen=True)
class StepReport:
    """What happened to one device on one host."""

    index: int
    outcome: Outcome
    wait: float = 0.0
    round_id: int = 0
    joined: bool = False  # this step opened a session here (first enrollment, or the device came from elsewhere)
    refusal: str = ""  # the refusal kind of a RETRY (e.g. RateLimited)
    error: str = ""
    host: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class HostStats:
    """A host's process and what it did (for the run's engine report)."""

    host: str
    pid: int
    peak_rss_bytes: int
    steps: dict[str, int]
    sessions: int


@dataclass(frozen=True)
class BaselineJob:
    """One local-only baseline for a host to train."""

    index: int
    data: str
    epochs: int
    seed: int


class DeviceHost:
    """Advances the virtual devices a driver sends it (see the module docstring)."""

    def __init__(self, cfg: HostConfig, name: str = "host") -> None:
        self.cfg, self.name = cfg, name
        if cfg.log_file:
            _log_to(Path(cfg.log_file))
        self._tls = TlsConfig(ca=Path(cfg.ca)) if cfg.ca else TlsConfig.plaintext()
        self._channel = FederationClient(cfg.server, tls=self._tls, timeout=POLL_TIMEOUT)
        self._sessions: dict[int, FederationClient] = {}  # device index -> its client (its session) here
        self._stop = threading.Event()  # never set: a virtual device stops when the driver stops sending it
        self._counts: Counter[str] = Counter()
        log.info("%s (pid %d) serving devices of %s", name, os.getpid(), cfg.server)

    # ------------------------------------------------------------------ driver calls

    def advance(self, orders: Sequence[DeviceOrder], forget: Iterable[int] = ()) -> list[StepReport]:
        """One step of each device in `orders`, in order; `forget` first drops the sessions of devices
        that have moved to another host (their next session is made there)."""
        self.forget(forget)
        return [self._advance_one(order) for order in orders]

    def join(self, orders: Sequence[DeviceOrder]) -> list[StepReport]:
        """Enroll (the first time) and join each device, without asking for a task: a fleet can come
        online before any of its devices counts as waiting for a round."""
        out = []
        for order in orders:
            t0 = time.perf_counter()
            client = self._channel.sibling()
            try:
                agent = Agent(self._agent_config(order), self._stop, server=client)
                try:
                    agent.join()
                finally:
                    agent.close()
            except Exception as exc:  # noqa: BLE001 - like a device process that died at start: lost
                report = self._failed(order, exc)
            else:
                self._sessions[order.index] = client
                report = StepReport(order.index, Outcome.JOINED, joined=True)
            self._counts[report.outcome.value] += 1
            out.append(dataclasses.replace(report, host=self.name, seconds=time.perf_counter() - t0))
        return out

    def forget(self, indices: Iterable[int]) -> None:
        """Drop the sessions of devices that no longer run here."""
        for i in indices:
            self._sessions.pop(i, None)

    def local_only(self, jobs: Sequence[BaselineJob], model: str, memory: str) -> list[LocalOnlyResult | None]:
        """Local-only baselines (a fresh model on one device's data), in this process; None where one failed."""
        out: list[LocalOnlyResult | None] = []
        for job in jobs:
            try:
                out.append(local_only(Path(job.data), Path(model), max(1, job.epochs), job.seed, memory))
            except Exception as exc:  # noqa: BLE001 - one device's baseline failing is a gap in its row
                log.warning("local-only baseline of device %d failed: %s", job.index, exc)
                out.append(None)
        return out

    def stats(self) -> HostStats:
        from fedpers.client.agent import peak_rss_bytes

        return HostStats(self.name, os.getpid(), peak_rss_bytes(), dict(self._counts), len(self._sessions))

    def close(self) -> None:
        self._sessions.clear()
        self._channel.close()

    # ------------------------------------------------------------------ one device

    def _advance_one(self, order: DeviceOrder) -> StepReport:
        t0 = time.perf_counter()
        polled = self._poll(order)
        report = polled if isinstance(polled, StepReport) else self._agent_step(order, polled)
        report = dataclasses.replace(report, host=self.name, seconds=time.perf_counter() - t0)
        self._counts[report.outcome.value] += 1
        return report

    def _poll(self, order: DeviceOrder) -> StepReport | wire.Task | None:
        """GetTask on the device's own session. A WAIT, or a refusal to retry later, is the whole step (a
        StepReport); a task with work goes to the agent; None: no usable session here, the agent joins."""
        client = self._sessions.get(order.index)
        if client is None:
            return None
        try:
            task = client.get_task()
        except grpc.RpcError as exc:
            kind = wire.refusal_of(exc)
            if kind in (wire.Refusal.RATE_LIMITED, wire.Refusal.TOO_MANY_STREAMS):
                return StepReport(order.index, Outcome.RETRY, wait=wire.retry_after_of(exc) or UNAVAILABLE_WAIT,
                                  refusal=kind.value)
            if exc.code() in RETRYABLE:
                return StepReport(order.index, Outcome.RETRY, wait=wire.retry_after_of(exc) or UNAVAILABLE_WAIT,
                                  refusal=exc.code().name)
            self._sessions.pop(order.index, None)  # e.g. a session another host replaced: join again
            return None
        if task.kind == wire.TaskKind.WAIT:
            return StepReport(order.index, Outcome.WAIT, wait=task.retry_after_seconds or 0.5)
        return task

    def _agent_step(self, order: DeviceOrder, task: wire.Task | None) -> StepReport:
        """The device's own agent over its state directory takes one step (`task`, or it asks), then lets go."""
        client = self._sessions.get(order.index)
        joined = client is None
        client = client or self._channel.sibling()
        try:
            agent = Agent(self._agent_config(order), self._stop, server=client)
        except Exception as exc:  # noqa: BLE001 - a device that cannot start is lost; the host goes on
            return self._failed(order, exc)
        try:
            step = agent.step(task)
            self._sessions[order.index] = client
            if step.kind is StepKind.DONE:
                self._final_report(agent)
        except Exception as exc:  # noqa: BLE001 - like a device process that died: lost, the others go on
            self._sessions.pop(order.index, None)
            return self._failed(order, exc)
        finally:
            agent.close()
        outcome = {StepKind.WAIT: Outcome.WAIT, StepKind.TRAINED: Outcome.TRAINED,
                   StepKind.REFUSED: Outcome.REFUSED, StepKind.DONE: Outcome.DONE}[step.kind]
        return StepReport(order.index, outcome, wait=step.wait, round_id=step.round_id, joined=joined)

    def _final_report(self, agent: Agent) -> None:
        """The device's report at the end, as `fedpers-client run` writes it; the last round's memory
        report is kept from the report that round wrote (this Agent did not train that round)."""
        path = agent.store.report_path
        previous = read_report(path)
        rep = agent.report(finished=True, reason="done")
        if rep.memory_report is None and previous is not None:
            rep = dataclasses.replace(rep, memory_report=previous.memory_report)
        write_report(path, rep)

    def _failed(self, order: DeviceOrder, exc: BaseException) -> StepReport:
        log.error("device %d (%s) failed: %s: %s", order.index, order.name, type(exc).__name__, exc)
        detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
        return StepReport(order.index, Outcome.FAILED, error=f"{type(exc).__name__}: {detail}"[:500])

    def _agent_config(self, order: DeviceOrder) -> AgentConfig:
        return AgentConfig(server=self.cfg.server, data=Path(order.data), state=Path(order.state), tls=self._tls,
                           enroll_token=os.environ.get(ENV_ENROLL_TOKEN, "").strip(), memory=self.cfg.memory,
                           memory_budget=self.cfg.memory_budget, local_epochs=self.cfg.local_epochs,
                           name=order.name, retry_seconds=self.cfg.retry_seconds)


def _log_to(path: Path) -> None:
    """Send this process's fedpers logging to `path` (a Ray worker's stderr is not where anyone looks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    root = logging.getLogger("fedpers")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
