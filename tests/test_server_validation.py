"""Bad input over real gRPC on 127.0.0.1: each refusal has its status code, and the aggregate is unchanged."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from fedpers import codec, wire
from fedpers.rpc import federation_pb2 as pb
from fedpers.server import app
from fedpers.server import state as st
from fedpers.server.config import ServerConfig
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server_helpers import (
    LAYOUT,
    Device,
    header,
    initial_weights,
    make_coordinator,
    random_delta,
    server_tls,
    update_blob,
)

Code = grpc.StatusCode


def _cfg(tmp_path: Path, **kw) -> ServerConfig:
    return ServerConfig(model=tmp_path / "unused.ini", store=tmp_path, listen="127.0.0.1:0", workers=4, **server_tls(),
                        **kw)


@pytest.fixture
def fed(tmp_path: Path):
    """A running server (fake 2-tensor model, min 2 devices) with two devices in an open round."""
    coord = make_coordinator(tmp_path, min_devices=2, rounds=2, max_update_bytes=64 << 10, round_timeout=600,
                             clock=__import__("time").time)
    # the bad uploads below come faster than the per-device upload rate allows (tests/test_limits.py)
    running = app.start(_cfg(tmp_path, round_timeout=600, rate_scale=10), coordinator=coord)
    a, b = Device(running.address, "a"), Device(running.address, "b")
    assert a.task().kind == wire.TaskKind.WAIT
    task = b.task()
    assert task.kind == wire.TaskKind.TRAIN and a.task().round_id == task.round_id
    yield running, a, b, task
    a.close()
    b.close()
    running.stop(grace=1)


def _msgs(task: wire.Task, blob: bytes, chunk_size: int = 100, **hdr_changes):
    hdr = header(task, blob)
    hdr = wire.UpdateHeader(**{**hdr.__dict__, **hdr_changes})
    return list(wire.upload_messages(hdr, blob, chunk_size))


def _snapshot(coord):
    return coord.aggregator.count, {k: v.copy() for k, v in coord.aggregator._sums.items()}


def _assert_unchanged(coord, snap, round_id: int) -> None:
    count, sums = snap
    assert coord.aggregator.count == count and coord.state.count_updates(round_id) == count
    for k, v in sums.items():
        np.testing.assert_array_equal(coord.aggregator._sums[k], v)


def _refused(fn, code: Code, match: str, kind: wire.Refusal | None = None, by_servicer: bool = True) -> None:
    """The call fails with `code`, a message containing `match`, and (when the servicer refused it, not
    gRPC's transport) its refusal kind in the trailing metadata, which is also how the message starts."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details(), info.value.details()
    if not by_servicer:
        return
    got = wire.refusal_of(info.value)
    assert got is not None and info.value.details().startswith(f"{got}: "), (got, info.value.details())
    if kind is not None:
        assert got is kind


def _nan_fp32_payload(shape) -> bytes:
    payload, _ = codec.encode("fp32", np.zeros(shape, np.float32))
    return payload[:-4] + np.array([np.inf], "<f4").tobytes()  # fp32 body is raw floats; poison the last


def _bad_cases(task: wire.Task):
    good = random_delta(5)
    shapes = LAYOUT.shared_shapes

    def with_tensor(name, t):
        ts = [wire.encoded_to_wire(k, v.shape, "fp32", codec.encode("fp32", v)[0])
              for k, v in good.items() if k != name]
        return wire.tensorset_to_blob([*ts, t] if t is not None else ts)

    unknown = wire.tensorset_to_blob([wire.encoded_to_wire(k, v.shape, "fp32", codec.encode("fp32", v)[0])
                                      for k, v in {**good, "head.weight": np.zeros((3, 2), np.float32)}.items()])
    blob = update_blob(good)
    truncated = _msgs(task, blob)[:-1]
    corrupted = _msgs(task, blob)
    corrupted[2].chunk.data = b"\xff" + corrupted[2].chunk.data[1:]
    lying = _msgs(task, blob, total_size=len(blob) - 50)
    for m in lying[1:]:
        m.chunk.total_size = len(blob) - 50  # header and chunks agree, but more bytes follow
    return [
        ("wrong round", _msgs(task, blob, round_id=task.round_id + 7), Code.FAILED_PRECONDITION, "is not open"),
        ("stale base", _msgs(task, blob, base_version=3), Code.FAILED_PRECONDITION, "trained from version 3"),
        ("a personal tensor", _msgs(task, unknown), Code.INVALID_ARGUMENT,
         "LocalTensor: tensor(s) ['head.weight'] stay on the device"),
        ("missing tensor", _msgs(task, with_tensor("fc1.bias", None)), Code.INVALID_ARGUMENT,
         "missing tensor(s) ['fc1.bias']"),
        ("wrong shape", _msgs(task, with_tensor("fc1.bias", wire.encoded_to_wire(
            "fc1.bias", (4,), "fp32", codec.encode("fp32", np.zeros(4, np.float32))[0]))),
         Code.INVALID_ARGUMENT, "'fc1.bias' has shape (4,), expected (3,)"),
        ("wrong dtype", _msgs(task, with_tensor("fc1.bias", wire.array_to_wire("fc1.bias", np.zeros(3, np.int32)))),
         Code.INVALID_ARGUMENT, "dtype int32, expected float32"),
        ("NaN raw", _msgs(task, with_tensor("fc1.bias", wire.array_to_wire(
            "fc1.bias", np.array([0, np.nan, 0], np.float32)))), Code.INVALID_ARGUMENT, "NaN or Inf"),
        ("Inf in codec payload", _msgs(task, with_tensor("fc1.weight", wire.encoded_to_wire(
            "fc1.weight", shapes["fc1.weight"], "fp32", _nan_fp32_payload(shapes["fc1.weight"])))),
         Code.INVALID_ARGUMENT, "non-finite"),
        ("corrupted codec payload", _msgs(task, with_tensor("fc1.weight", wire.encoded_to_wire(
            "fc1.weight", shapes["fc1.weight"], "fp32", b"garbage"))), Code.INVALID_ARGUMENT, "fc1.weight"),
        ("truncated stream", truncated, Code.INVALID_ARGUMENT, "TruncatedStream"),
        ("checksum mismatch", corrupted, Code.INVALID_ARGUMENT, "ChecksumMismatch"),
        ("no header", _msgs(task, blob)[1:], Code.INVALID_ARGUMENT, "must start with an UpdateHeader"),
        ("oversize announced", _msgs(task, blob, total_size=1 << 20), Code.RESOURCE_EXHAUSTED, "exceeds the limit"),
        ("more bytes than announced", lying, Code.RESOURCE_EXHAUSTED, "more than the announced"),
        ("zero examples", _msgs(task, blob, num_examples=0), Code.INVALID_ARGUMENT, "num_examples"),
    ]


def test_bad_uploads_are_refused_and_leave_the_aggregate_unchanged(fed) -> None:
    running, a, b, task = fed
    coord = running.coordinator
    a.upload(wire.upload_messages(header(task, update_blob(random_delta(1))), update_blob(random_delta(1)), 100))
    snap = _snapshot(coord)
    assert snap[0] == 1
    for what, msgs, code, match in _bad_cases(task):
        _refused(lambda m=msgs: b.upload(m), code, match)
        _assert_unchanged(coord, snap, task.round_id)
        assert coord.version == 0, what
    # a device that already reported, and one that is not selected
    blob = update_blob(random_delta(2))
    _refused(lambda: a.upload(_msgs(task, blob)), Code.FAILED_PRECONDITION, "already reported",
             wire.Refusal.ALREADY_REPORTED)
    outsider = Device(running.address, "c")
    _refused(lambda: outsider.upload(_msgs(task, blob)), Code.FAILED_PRECONDITION, "not selected",
             wire.Refusal.NOT_SELECTED)
    outsider.close()
    _assert_unchanged(coord, snap, task.round_id)


def test_oversize_single_message_is_refused_by_the_transport(fed) -> None:
    running, a, b, task = fed
    snap = _snapshot(running.coordinator)
    big = pb.UploadMessage(chunk=pb.Chunk(offset=0, data=b"x" * (3 << 20), total_size=3 << 20))
    hdr = pb.UploadMessage(header=wire.update_header_to_proto(header(task, b"x" * 10)))
    _refused(lambda: b.upload([hdr, big]), Code.RESOURCE_EXHAUSTED, "", by_servicer=False)
    _assert_unchanged(running.coordinator, snap, task.round_id)


def test_wrong_token_is_unauthenticated_on_every_call(fed) -> None:
    running, a, b, task = fed
    snap = _snapshot(running.coordinator)
    blob = update_blob(random_delta(1))
    bad = wire.auth_metadata(a.id, "not-the-token")
    calls = [
        lambda: a.stub.GetTask(pb.TaskRequest(), metadata=bad, timeout=10),
        lambda: list(a.stub.DownloadModel(pb.DownloadRequest(version=0), metadata=bad, timeout=10)),
        lambda: a.stub.UploadUpdate(iter(_msgs(task, blob)), metadata=bad, timeout=10),
        lambda: a.stub.GetTask(pb.TaskRequest(), timeout=10),  # no metadata at all
        lambda: a.stub.GetTask(pb.TaskRequest(), metadata=wire.auth_metadata(999, a.token), timeout=10),
    ]
    for call in calls:
        _refused(call, Code.UNAUTHENTICATED, "BadToken", wire.Refusal.BAD_TOKEN)
    _refused(lambda: a.stub.Enroll(pb.EnrollRequest(enroll_token="wrong", request_id="r" * 16), timeout=10),
             Code.UNAUTHENTICATED, "enrollment")
    _refused(lambda: a.stub.Join(pb.JoinRequest(device_id=a.id, device_secret="not-the-secret"), timeout=10),
             Code.UNAUTHENTICATED, "wrong device secret")
    _refused(lambda: a.stub.GetStatus(pb.StatusRequest(), timeout=10), Code.UNAUTHENTICATED, "BadToken")
    _assert_unchanged(running.coordinator, snap, task.round_id)


def test_download_status_health_and_a_full_round(fed) -> None:
    running, a, b, task = fed
    v0 = a.download(0)
    assert set(v0) == set(LAYOUT.shapes) and "head.weight" not in v0
    np.testing.assert_array_equal(v0["fc1.weight"], initial_weights()["fc1.weight"])
    resumed = list(a.stub.DownloadModel(pb.DownloadRequest(version=0, offset=50), metadata=a.md, timeout=10))
    assert resumed[0].offset == 50
    _refused(lambda: list(a.stub.DownloadModel(pb.DownloadRequest(version=5), metadata=a.md, timeout=10)),
             Code.NOT_FOUND, "version 5")
    d1, d2 = random_delta(11), random_delta(12)
    for dev, d, n in ((a, d1, 5), (b, d2, 15)):
        blob = update_blob(d)
        reply = dev.upload(wire.upload_messages(header(task, blob, n, accuracy=n / 20), blob))
        assert reply.accepted
    assert reply.updates_in_round == 2
    v1 = a.download(1)
    for k in LAYOUT.shared:
        np.testing.assert_allclose(v1[k], v0[k] + (5 * d1[k].astype(np.float64) + 15 * d2[k]) / 20, rtol=1e-5)
    status = a.status()  # a device session (or the admin token) is needed
    assert status.version == 1 and status.rounds_completed == 1 and status.devices_joined == 2
    assert status.rounds[0].state == "closed" and status.rounds[0].metrics["accuracy"] == pytest.approx(0.625)
    health = health_pb2_grpc.HealthStub(a.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    _refused(lambda: a.upload(_msgs(task, update_blob(d1))), Code.FAILED_PRECONDITION, "already reported",
             wire.Refusal.ALREADY_REPORTED)  # its update was counted in the round that closed


def test_restart_continues_from_the_last_version(tmp_path: Path) -> None:
    def start():
        import time

        coord = make_coordinator(tmp_path, state=st.SqliteState(tmp_path / "state.sqlite"), strategy="fedadam",
                                 min_devices=1, rounds=5, clock=time.time)
        return app.start(_cfg(tmp_path), coordinator=coord)

    running = start()
    dev = Device(running.address, "solo")
    for seed in (1, 2):
        t = dev.task()
        blob = update_blob(random_delta(seed))
        dev.upload(wire.upload_messages(header(t, blob), blob))
    weights = dev.download(2)
    adam_t = running.coordinator.optimizer.t
    open_round = dev.task()  # a round is open when the server stops
    dev.close()
    running.stop(grace=1)
    running2 = start()
    try:
        dev = Device(running2.address, "solo", credentials=dev.credentials)  # the same device, by its secret
        status = dev.status()
        assert status.version == 2 and status.rounds_completed == 2
        assert running2.coordinator.optimizer.t == adam_t == 2
        t = dev.task()
        assert t.kind == wire.TaskKind.TRAIN and t.base_version == 2 and t.round_id == open_round.round_id
        got = dev.download(2)
        for k in weights:
            np.testing.assert_array_equal(got[k], weights[k])
        continued = [r for r in status.rounds if r.round_id == open_round.round_id]
        assert continued and continued[0].state == "open"  # stopped and started: the round goes on
        dev.close()
    finally:
        running2.stop(grace=1)


def test_a_slow_upload_leaves_a_thread_for_everything_else(tmp_path: Path) -> None:
    """Two handler threads give one upload slot: a second upload is told to retry (UNAVAILABLE)
    while the first is still streaming, and GetStatus / GetTask keep answering."""
    import threading
    import time

    coord = make_coordinator(tmp_path, min_devices=2, rounds=2, max_update_bytes=64 << 10, round_timeout=600,
                             clock=time.time)
    cfg = ServerConfig(model=tmp_path / "unused.ini", store=tmp_path, listen="127.0.0.1:0", workers=2,
                       round_timeout=600, **server_tls())
    running = app.start(cfg, coordinator=coord)
    a, b = Device(running.address, "a"), Device(running.address, "b")
    try:
        a.task()
        task = b.task()
        assert task.kind == wire.TaskKind.TRAIN
        blob_a, blob_b = update_blob(random_delta(1)), update_blob(random_delta(2))
        release, sent_header = threading.Event(), threading.Event()

        def slow():
            msgs = _msgs(task, blob_a)
            yield msgs[0]
            sent_header.set()
            release.wait(10)
            yield from msgs[1:]

        result = {}
        t = threading.Thread(target=lambda: result.update(
            reply=a.stub.UploadUpdate(slow(), metadata=a.md, timeout=20)))
        t.start()
        assert sent_header.wait(10)
        deadline = time.monotonic() + 5
        while coord.aggregator.count == 0 and time.monotonic() < deadline:
            try:
                b.upload(_msgs(task, blob_b))
            except grpc.RpcError as e:
                assert e.code() == Code.UNAVAILABLE and "upload slots" in e.details(), e.details()
                break
        else:
            raise AssertionError("the second upload was not refused while the first held the only slot")
        assert b.status().current_round == task.round_id
        assert b.task().round_id == task.round_id
        release.set()
        t.join(10)
        assert result["reply"].accepted
        assert b.upload(_msgs(task, blob_b)).accepted  # the retry goes through once the slot is free
    finally:
        release.set()
        a.close()
        b.close()
        running.stop(grace=1)


def test_every_mapped_refusal_has_a_kind_devices_can_match() -> None:
    from fedpers.server.service import ERROR_STATUS

    def with_subclasses(kind: type) -> list[type]:
        return [kind] + [k for sub in kind.__subclasses__() for k in with_subclasses(sub)]

    for mapped, _ in ERROR_STATUS:
        for kind in with_subclasses(mapped):
            assert wire.Refusal(kind.__name__).value == kind.__name__
