"""Bounded resources over real gRPC on 127.0.0.1 (TLS): stalled streams, stream and call rates, field sizes.

Attacks 4-6 of issue 10: three upload streams that sent nothing held every upload slot (0 rounds
closed in 126 s); a 0.9 MiB device name was stored and logged; 24,000 metric keys in two uploads
made GetStatus fail for good while health said SERVING; GetStatus needed no credentials and
GetTask had no rate limit (3,000/s from one device).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedpers import wire
from fedpers.rpc import federation_pb2 as pb
from fedpers.server import app
from fedpers.server import state as st
from fedpers.server.config import ServerConfig
from fedpers.server.limits import LimitsPolicy, Rate, RateLimiter, Watchdog
from fedpers.server.service import MAX_RECEIVE_BYTES, MAX_SEND_BYTES
from fedpers.server.status import build_status
from fedpers.stub import FederationClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server_helpers import (
    Clock,
    Device,
    client_tls,
    header,
    make_coordinator,
    random_delta,
    server_tls,
    update_blob,
)

Code = grpc.StatusCode


def _start(tmp_path: Path, workers: int = 4, **cfg):
    policy = {k: cfg.pop(k) for k in ("min_devices", "rounds") if k in cfg}
    coord = make_coordinator(tmp_path, clock=time.time, round_timeout=600, **{"min_devices": 2, **policy})
    config = ServerConfig(model=tmp_path / "unused.ini", store=tmp_path, listen="127.0.0.1:0", workers=workers,
                          round_timeout=600, **server_tls(), **cfg)
    return app.start(config, coordinator=coord)


def _messages(task: wire.Task, seed: int, chunk_size: int = 100, **metrics: float):
    blob = update_blob(random_delta(seed))
    return list(wire.upload_messages(header(task, blob, **metrics), blob, chunk_size))


@pytest.fixture
def server_log():
    """Everything the server logs during a test, as text (level name first)."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fedpers")
    old = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    yield buf
    root.removeHandler(handler)
    root.setLevel(old)


def test_silent_upload_streams_no_longer_stop_a_round(tmp_path: Path, server_log) -> None:
    """Attack 4: three attackers open upload streams and send nothing, on a server with 3 upload slots."""
    running = _start(tmp_path, workers=4, stream_idle_timeout=2.0)
    release = threading.Event()
    try:
        a, b = Device(running.address, "a"), Device(running.address, "b")
        a.task()
        task = b.task()
        attackers = [Device(running.address, f"x{i}") for i in range(3)]

        def silent():
            release.wait(30)
            yield from ()

        t0 = time.monotonic()
        calls = [x.stub.UploadUpdate.future(silent(), metadata=x.md, timeout=30) for x in attackers]
        time.sleep(0.5)
        # the honest devices' uploads take no slot from the silent streams, and the round closes at once
        assert a.upload(_messages(task, 1)).accepted and b.upload(_messages(task, 2)).accepted
        assert running.coordinator.version == 1
        assert time.monotonic() - t0 < 2.0, "the honest uploads had to wait for the silent streams"
        for call in calls:  # and the silent streams are cut after the idle timeout
            with pytest.raises(grpc.RpcError) as info:
                call.result(timeout=10)
            assert info.value.code() == Code.CANCELLED
        assert time.monotonic() - t0 < 8.0
    finally:
        release.set()
        running.stop(0)
    text = server_log.getvalue()
    assert text.count("INFO fedpers.server.limits: upload from device") == 3 and "nothing for" in text
    assert "ERROR" not in text and "Traceback" not in text


def test_a_trickling_upload_is_cut_below_the_minimum_rate(tmp_path: Path) -> None:
    running = _start(tmp_path, stream_idle_timeout=1.0, stream_min_rate=2000)
    try:
        a, b = Device(running.address, "a"), Device(running.address, "b")
        a.task()
        task = b.task()
        msgs = _messages(task, 3, chunk_size=20)

        def trickle():
            for m in msgs:
                yield m
                time.sleep(0.3)  # never idle for 1 s, but ~100 bytes/s

        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            a.stub.UploadUpdate(trickle(), metadata=a.md, timeout=30)
        assert info.value.code() == Code.CANCELLED and time.monotonic() - t0 < 5
        assert running.coordinator.aggregator.count == 0
        assert a.upload(_messages(task, 3)).accepted  # the same device at a normal pace
    finally:
        running.stop(0)


def test_streams_per_device_are_limited(tmp_path: Path) -> None:
    running = _start(tmp_path, workers=6, stream_idle_timeout=3.0)
    release = threading.Event()
    try:
        a = Device(running.address, "a")

        def silent():
            release.wait(10)
            yield from ()

        held = [a.stub.UploadUpdate.future(silent(), metadata=a.md, timeout=20) for _ in range(2)]
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as info:
            a.stub.UploadUpdate(silent(), metadata=a.md, timeout=20)
        assert info.value.code() == Code.RESOURCE_EXHAUSTED
        assert wire.refusal_of(info.value) is wire.Refusal.TOO_MANY_STREAMS
        assert wire.retry_after_of(info.value) == pytest.approx(1.0)
        b = Device(running.address, "b")  # another device is not affected
        assert len(b.download(0)) == 3
        release.set()
        for call in held:
            with pytest.raises(grpc.RpcError):
                call.result(timeout=10)  # an empty stream: no header
    finally:
        release.set()
        running.stop(0)


def _refused_as_oversized(err: grpc.RpcError) -> None:
    """gRPC's own refusal of a message above the server's receive limit (one chunk plus framing)."""
    assert err.code() == Code.RESOURCE_EXHAUSTED and "larger than max" in err.details(), err.details()
    assert str(MAX_RECEIVE_BYTES) in err.details()


def test_huge_names_and_metrics_are_refused_and_status_keeps_answering(tmp_path: Path, server_log) -> None:
    """Attack 5: a 0.9 MiB name, a name with a newline, and 24,000 metric keys per upload."""
    running = _start(tmp_path)
    try:
        with FederationClient(running.address, tls=client_tls(), timeout=10) as c:
            with pytest.raises(grpc.RpcError) as info:  # larger than any message a device sends: cut by gRPC
                c.enroll(wire.EnrollRequest("enroll-me", "n" * int(0.9 * (1 << 20)), "r" * 16))
            _refused_as_oversized(info.value)
            for name in ("n" * 65, "evil\nINFO forged log line", "../../etc"):
                with pytest.raises(grpc.RpcError) as info:
                    c.enroll(wire.EnrollRequest("enroll-me", name, "r" * 16))
                assert info.value.code() == Code.INVALID_ARGUMENT and "device name must be" in info.value.details()
                assert len(info.value.details()) < 3000
        assert running.coordinator.state.count_devices() == 0
        a, b = Device(running.address, "a"), Device(running.address, "b")
        a.task()
        task = b.task()
        for dev in (a, b):
            msgs = _messages(task, 4)
            wire.metrics_to_proto(msgs[0].header.metrics, {f"k{j:05d}_{'x' * 20}": 1.0 for j in range(24000)})
            with pytest.raises(grpc.RpcError) as info:
                dev.upload(msgs)
            _refused_as_oversized(info.value)
            msgs = _messages(task, 4)
            wire.metrics_to_proto(msgs[0].header.metrics, {f"k{j:05d}": 1.0 for j in range(100)})
            with pytest.raises(grpc.RpcError) as info:
                dev.upload(msgs)
            assert info.value.code() == Code.INVALID_ARGUMENT and "at most 32 are accepted" in info.value.details()
        for bad in ({"k" * 65: 1.0}, {"ok": 1e300}, {"new\nline": 1.0}):
            msgs = _messages(task, 5)
            wire.metrics_to_proto(msgs[0].header.metrics, bad)
            with pytest.raises(grpc.RpcError) as info:
                a.upload(msgs)
            assert info.value.code() == Code.INVALID_ARGUMENT
        status = a.status()  # still answers
        assert status.current_round == task.round_id
        health = health_pb2_grpc.HealthStub(a.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # the honest path: 32 well-formed metrics (and a NaN, dropped as before)
        ok = {f"m{j}": float(j) for j in range(31)} | {"loss": float("nan")}
        assert a.upload(_messages(task, 6, **ok)).accepted and b.upload(_messages(task, 7)).accepted
        assert a.status().rounds[-1].metrics["m30"] == pytest.approx(30.0)
    finally:
        running.stop(0)
    lines = server_log.getvalue().splitlines()
    assert max(len(line) for line in lines) < 1000
    assert not any(line.startswith("INFO forged") for line in lines)


def test_status_size_is_bounded_whatever_devices_reported() -> None:
    state = st.MemoryState()
    d = state.add_device("d", "s", 0.0).device_id
    worst = {f"{j:03d}" + "k" * (wire.MAX_METRIC_KEY_CHARS - 3): 1.0 for j in range(5 * wire.MAX_METRICS)}
    for _ in range(300):
        r = state.open_round(0, (d,), 0.0, 1.0)
        state.close_round(r.round_id, 1, worst, 1.0)  # a round's union over many devices' keys
    status = build_status(state, 1, 300, False, problem="p" * 100_000)
    size = wire.status_to_proto(status).ByteSize()
    assert size < MAX_SEND_BYTES // 4, size
    assert all(len(r.metrics) == wire.MAX_METRICS for r in status.rounds)


def test_call_rates_per_device_with_a_retry_hint(tmp_path: Path) -> None:
    """Attack 6: GetTask and GetStatus floods from one authenticated device."""
    running = _start(tmp_path, min_devices=5)
    try:
        flooder, honest = Device(running.address, "flood"), Device(running.address, "honest")
        refused = 0
        hints = []
        t0 = time.monotonic()
        for _ in range(200):
            try:
                flooder.task()
            except grpc.RpcError as exc:
                assert exc.code() == Code.RESOURCE_EXHAUSTED and wire.refusal_of(exc) is wire.Refusal.RATE_LIMITED
                refused += 1
                hints.append(wire.retry_after_of(exc))
        elapsed = time.monotonic() - t0
        answered = 200 - refused
        assert answered <= 20 + 5 * elapsed + 2, (answered, elapsed)  # burst + rate * time
        assert hints and all(0 < h <= 1.0 for h in hints)
        assert honest.task().kind == wire.TaskKind.WAIT  # the other device is not limited
        status_refused = 0
        for _ in range(30):
            try:
                flooder.status()
            except grpc.RpcError as exc:
                assert wire.refusal_of(exc) is wire.Refusal.RATE_LIMITED
                status_refused += 1
        assert status_refused >= 20
        time.sleep(max(hints))
        assert flooder.task().kind == wire.TaskKind.WAIT  # after the hinted wait it is served again
    finally:
        running.stop(0)


def test_the_agent_waits_at_least_the_servers_hint(tmp_path: Path) -> None:
    from fedpers.client.agent import Agent, AgentConfig
    from fedpers.client.partition import partition_digits, write_partition

    class Limited(grpc.RpcError):
        def code(self):
            return Code.RESOURCE_EXHAUSTED

        def details(self):
            return "RateLimited: GetTask: more than 5 calls/s"

        def trailing_metadata(self):
            return wire.refusal_metadata(wire.Refusal.RATE_LIMITED, 0.75)

    write_partition(tmp_path / "data", partition_digits(2, seed=0)[:1])
    agent = Agent(AgentConfig(server="127.0.0.1:1", data=tmp_path / "data" / "device-0.npz", state=tmp_path / "s",
                              tls=client_tls(), backoff_initial=0.01))
    waits: list[float] = []
    agent._wait = waits.append  # type: ignore[method-assign]
    calls = iter([Limited(), Limited(), "ok"])

    def call():
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    try:
        assert agent._retry("GetTask", call) == "ok"
    finally:
        agent.close()
    assert len(waits) == 2 and all(w >= 0.75 for w in waits)


def test_rate_limiter_and_watchdog_units() -> None:
    clock = Clock(0.0)
    limiter = RateLimiter({"GetTask": Rate(2.0, 3)}, clock=clock)
    for _ in range(3):
        limiter.take(1, "GetTask")
    with pytest.raises(Exception, match="retry in 0.50s") as info:
        limiter.take(1, "GetTask")
    assert info.value.retry_after == pytest.approx(0.5)
    limiter.take(2, "GetTask")  # per caller
    limiter.take(1, "Other")  # unlisted methods are not limited
    clock.t += 0.5
    limiter.take(1, "GetTask")
    assert LimitsPolicy.for_server(0.1).rates["GetTask"].per_second == 20.0
    assert LimitsPolicy.for_server(0.5, rate_scale=0).rates == {}

    class Ctx:
        cancelled = 0

        def cancel(self):
            self.cancelled += 1

    dog = Watchdog(idle_timeout=5.0, min_rate=100.0, clock=clock)
    idle, slow, fine = Ctx(), Ctx(), Ctx()
    with dog.watch(idle, "idle") as wi, dog.watch(slow, "slow") as ws, dog.watch(fine, "fine") as wf:
        for _ in range(6):
            clock.t += 1.0
            ws.progress(10, clock.t)  # 10 bytes/s: alive but too slow
            wf.progress(1000, clock.t)
            dog.sweep()
        assert (idle.cancelled, slow.cancelled, fine.cancelled) == (1, 1, 0)
        assert "nothing for" in wi.cut and "below the minimum" in ws.cut and wf.cut is None
        with pytest.raises(Exception, match="idle cut: nothing for"):
            list(dog.iterate(wi, iter(()), len))


def test_field_limits_in_wire() -> None:
    assert wire.check_device_name("device-0.lab_1") == "device-0.lab_1"
    assert wire.check_device_name("") == ""
    for bad in ("-lead", "a" * 65, "sp ace", "ünï", "a\x1b[31m"):
        with pytest.raises(wire.MalformedMessage):
            wire.check_device_name(bad)
    with pytest.raises(wire.MalformedMessage, match="at most 32"):
        wire.check_metrics({f"k{i}": 0.0 for i in range(33)})
    with pytest.raises(wire.MalformedMessage, match="beyond"):
        wire.check_metrics({"x": -2e15})
    header = pb.UpdateHeader(round_id=1, codec="c" * 65)
    with pytest.raises(wire.MalformedMessage, match="codec name"):
        wire.update_header_from_proto(header)
    with pytest.raises(wire.MalformedMessage, match="request_id"):
        wire.enroll_request_from_proto(pb.EnrollRequest(enroll_token="t", device_name="d", request_id="short"))
    with pytest.raises(wire.MalformedMessage, match="enroll_token"):
        wire.enroll_request_from_proto(pb.EnrollRequest(enroll_token="t" * 300, request_id="r" * 16))
    assert np.isnan(wire.check_metrics({"loss": float("nan")})["loss"])
