"""The server benchmarks' harness: a server process (TLS, tokens in its environment) and protocol-level
devices that enroll, join, then take every round with a fixed update blob, retrying as the agent does."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from fedpers import wire
from fedpers.backoff import Backoff
from fedpers.pki import make_dev_pki
from fedpers.stub import FederationClient
from fedpers.tls import TlsConfig

T = TypeVar("T")


@dataclass
class DeviceStats:
    uploads: int = 0
    late: int = 0  # refused because the round had closed at its target before the update arrived
    busy: int = 0  # refused as busy (all upload slots taken) or rate-limited, and retried
    error: str = ""
    latencies: list[float] = field(default_factory=list)  # seconds from first attempt to acceptance
    accepted_at: list[float] = field(default_factory=list)  # monotonic time of each acceptance


def run_fake_device(address: str, tls: TlsConfig, enroll_token: str, name: str, blob: bytes, deadline: float,
                    out: DeviceStats, joined: threading.Barrier, go: threading.Event, backoff_max: float = 1.0) -> None:
    """Join, wait until all devices joined (`joined`) and the start (`go`), then upload `blob` in every round
    this device is selected for, until DONE or the deadline."""
    digest = wire.sha256(blob)
    with FederationClient(address, tls=tls, timeout=120) as client:
        try:
            request = wire.EnrollRequest(enroll_token, name, request_id=secrets.token_urlsafe(16))
            enrolled = _retried(lambda: client.enroll(request), deadline)  # hundreds enroll at once: some wait
            _retried(lambda: client.join(wire.JoinRequest(enrolled.device_id, enrolled.device_secret)), deadline)
            joined.wait(timeout=max(1.0, deadline - time.monotonic()))
            go.wait(timeout=max(1.0, deadline - time.monotonic()))
            done_round = 0
            while time.monotonic() < deadline:
                task = client.get_task()
                if task.kind == wire.TaskKind.DONE:
                    return
                if task.kind == wire.TaskKind.WAIT or task.round_id == done_round:
                    time.sleep(max(0.05, task.retry_after_seconds))
                    continue
                header = wire.UpdateHeader(task.round_id, task.base_version, 100, len(blob), digest, "fp32")
                _upload(client, header, blob, deadline, out, Backoff(initial=0.05, maximum=backoff_max))
                done_round = task.round_id
            out.error = "deadline"
        except grpc.RpcError as exc:
            out.error = f"{exc.code().name}: {exc.details()}"
            joined.abort()  # the others (and the bench) must not wait for a device that is gone
        except threading.BrokenBarrierError:
            out.error = "barrier"


def _retried(call: Callable[[], T], deadline: float) -> T:
    """A call retried, as the agent does, while the server is busy or rate-limits (UNAVAILABLE,
    RESOURCE_EXHAUSTED with a hint) and the deadline allows."""
    backoff = Backoff(initial=0.05, maximum=2.0)
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            retry = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
            if not retry or time.monotonic() > deadline:
                raise
            time.sleep(backoff.next(wire.retry_after_of(exc)))


def _upload(client: FederationClient, header: wire.UpdateHeader, blob: bytes, deadline: float, out: DeviceStats,
            backoff: Backoff) -> None:
    """One update, retried like the agent does: busy slots (UNAVAILABLE) or a rate limit mean wait and retry."""
    t0 = time.monotonic()
    while True:
        try:
            client.upload(header, blob, timeout=120)
        except grpc.RpcError as exc:
            kind = wire.refusal_of(exc)
            if kind in (wire.Refusal.LATE_UPDATE, wire.Refusal.STALE_ROUND):
                out.late += 1
                return
            limited = kind is wire.Refusal.RATE_LIMITED
            if (exc.code() != grpc.StatusCode.UNAVAILABLE and not limited) or time.monotonic() > deadline:
                raise
            out.busy += 1
            time.sleep(backoff.next(wire.retry_after_of(exc)))
            continue
        now = time.monotonic()
        out.uploads += 1
        out.latencies.append(now - t0)
        out.accepted_at.append(now)
        return


@dataclass
class BenchServer:
    """A fedpers-server process for a benchmark: TLS with a throwaway CA, the enrollment and admin tokens in
    its environment; `address` once it serves. Use as a context manager (terminated at exit)."""

    proc: subprocess.Popen
    address: str
    tls: TlsConfig
    enroll_token: str
    admin_token: str

    @classmethod
    def start(cls, workdir: Path, model: Path, *flags: str) -> BenchServer:
        port_file = workdir / "port"
        pki = make_dev_pki(workdir / "tls")
        enroll, admin = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        cmd = [sys.executable, "-m", "fedpers.server", "--model", str(model), "--store", str(workdir / "store"),
               "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--listen", "127.0.0.1:0",
               "--port-file", str(port_file), "--personal-layers", "output", "--log-level", "WARNING", *flags]
        log = workdir / "server.log"  # a file, not a pipe: a pipe nobody drains stalls a server that logs
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out,
                                    env=dict(os.environ, FEDPERS_ENROLL_TOKEN=enroll, FEDPERS_ADMIN_TOKEN=admin))
        limit = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > limit:
                proc.kill()
                raise RuntimeError(f"server did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return cls(proc, f"127.0.0.1:{int(port_file.read_text())}", TlsConfig(ca=pki.ca_cert), enroll, admin)

    def start_devices(self, n: int, prefix: str, blob: bytes, deadline: float, stats: list[DeviceStats],
                      backoff_max: float = 1.0) -> tuple[list[threading.Thread], threading.Barrier, threading.Event]:
        """n fake device threads; they enroll, then wait on the returned barrier (with this thread as the
        n+1st party) and start taking rounds when the event is set."""
        joined, go = threading.Barrier(n + 1), threading.Event()
        threads = [threading.Thread(target=run_fake_device, args=(self.address, self.tls, self.enroll_token,
                                                                  f"{prefix}-{i}", blob, deadline, stats[i], joined,
                                                                  go, backoff_max), daemon=True, name=f"dev-{i}")
                   for i in range(n)]
        for t in threads:
            t.start()
        return threads, joined, go

    @staticmethod
    def wait_joined(joined: threading.Barrier, timeout: float) -> None:
        """Wait until every device joined; a device that failed breaks the barrier (its error is in its stats)."""
        try:
            joined.wait(timeout=timeout)
        except threading.BrokenBarrierError:
            pass

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
