"""A protocol-level device for the server benchmarks: enroll, join, then take every round with a fixed
update blob, retrying as the agent does; what it saw is counted in a DeviceStats."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import grpc
from fedpers import wire
from fedpers.backoff import Backoff
from fedpers.stub import FederationClient
from fedpers.tls import TlsConfig


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
            enrolled = client.enroll(wire.EnrollRequest(enroll_token, name, request_id=secrets.token_urlsafe(16)))
            client.join(wire.JoinRequest(enrolled.device_id, enrolled.device_secret))
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
        except threading.BrokenBarrierError:
            out.error = "barrier"


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
