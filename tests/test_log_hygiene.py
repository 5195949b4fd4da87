"""Errors and logs over real gRPC on 127.0.0.1 (TLS).

Attack 7 of issue 10: a cancelled upload was logged as ERROR with a traceback and returned as
INTERNAL, and protobuf garbage got INTERNAL instead of INVALID_ARGUMENT. Now a cut upload is an
INFO line, undecodable requests are INVALID_ARGUMENT, and strings from the other side reach the
log escaped and truncated.
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
from fedpers.logsafe import clip
from fedpers.server import app
from fedpers.server.config import ServerConfig

from tests.server_helpers import Device, header, make_coordinator, random_delta, server_tls, update_blob

Code = grpc.StatusCode


@pytest.fixture
def fed(tmp_path: Path):
    """A server with two devices in an open round, and everything logged (root logger) as text."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    coord = make_coordinator(tmp_path, min_devices=2, rounds=2, round_timeout=600, clock=time.time)
    running = app.start(ServerConfig(model=tmp_path / "u.ini", store=tmp_path, listen="127.0.0.1:0",
                                     round_timeout=600, **server_tls()), coordinator=coord)
    a, b = Device(running.address, "a"), Device(running.address, "b")
    a.task()
    task = b.task()
    yield running, a, b, task, buf
    running.stop(0)
    root.removeHandler(handler)
    root.setLevel(old)


def test_a_cancelled_upload_is_info_not_error(fed) -> None:
    running, a, b, task, log = fed
    blob = update_blob(random_delta(1))
    msgs = list(wire.upload_messages(header(task, blob), blob, 100))
    sent = threading.Event()

    def stream():
        yield msgs[0]
        yield msgs[1]
        sent.set()
        time.sleep(10)

    before = log.tell()
    call = a.stub.UploadUpdate.future(stream(), metadata=a.md, timeout=30)
    assert sent.wait(5)
    time.sleep(0.3)
    call.cancel()
    deadline = time.monotonic() + 5
    while "UploadUpdate refused" not in log.getvalue()[before:] and time.monotonic() < deadline:
        time.sleep(0.05)
    text = log.getvalue()[before:]
    # gRPC ends a cancelled stream either with an error or (racing the cancel) as a short stream
    assert "INFO fedpers.server.service: UploadUpdate refused with" in text, text
    assert "cancelled by the caller" in text or "the stream ended after" in text, text
    assert "ERROR" not in text and "Traceback" not in text, text
    assert running.coordinator.aggregator.count == 0
    blob = update_blob(random_delta(2))  # the same device then uploads normally
    assert a.upload(wire.upload_messages(header(task, blob), blob)).accepted


def test_undecodable_requests_are_invalid_argument(fed) -> None:
    running, a, b, task, log = fed
    garbage = b"\xff\xff\xff garbage"
    calls = {
        "GetTask": a.channel.unary_unary("/fedpers.v1.Federation/GetTask"),
        "Enroll": a.channel.unary_unary("/fedpers.v1.Federation/Enroll"),
        "Join": a.channel.unary_unary("/fedpers.v1.Federation/Join"),
        "GetStatus": a.channel.unary_unary("/fedpers.v1.Federation/GetStatus"),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call(garbage, metadata=a.md, timeout=5)
        assert info.value.code() == Code.INVALID_ARGUMENT, (name, info.value.details())
        assert wire.refusal_of(info.value) is wire.Refusal.MALFORMED_MESSAGE
        assert "not a valid request message" in info.value.details()
    download = a.channel.unary_stream("/fedpers.v1.Federation/DownloadModel")
    with pytest.raises(grpc.RpcError) as info:
        list(download(garbage, metadata=a.md, timeout=5))
    assert info.value.code() == Code.INVALID_ARGUMENT
    upload = a.channel.stream_unary("/fedpers.v1.Federation/UploadUpdate")
    good = list(wire.upload_messages(header(task, b"x"), b"x"))[0].SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        upload(iter([good, garbage]), metadata=a.md, timeout=5)
    assert info.value.code() == Code.INVALID_ARGUMENT and "stream message" in info.value.details()
    # unauthenticated garbage is still refused for the missing session first
    with pytest.raises(grpc.RpcError) as info:
        calls["GetTask"](garbage, timeout=5)
    assert info.value.code() == Code.UNAUTHENTICATED
    text = log.getvalue()
    assert "ERROR" not in text and "Traceback" not in text and "deserializing" not in text, text
    assert running.coordinator.aggregator.count == 0


def test_strings_from_devices_are_escaped_and_truncated_in_logs(fed) -> None:
    running, a, b, task, log = fed
    evil = "fc1.bias\nERROR forged: the server was hacked\x1b[2J" + "x" * 5000
    tensors = [wire.encoded_to_wire(evil, (3,), "fp32", b"\0" * 8)]
    blob = wire.tensorset_to_blob(tensors)
    with pytest.raises(grpc.RpcError) as info:
        a.upload(wire.upload_messages(header(task, blob), blob))
    assert info.value.code() == Code.INVALID_ARGUMENT and len(info.value.details()) <= 2100
    lines = log.getvalue().splitlines()
    assert not any(line.startswith("ERROR forged") for line in lines)
    assert "\x1b" not in log.getvalue()
    assert max(len(line) for line in lines) < 600


def test_clip() -> None:
    assert clip("plain") == "plain"
    assert clip("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
    assert clip("x" * 10, limit=4) == "xxxx…(+6 chars)"
    assert clip(ValueError("boom\r")) == "boom\\r"
    assert clip(np.float32(1.5)) == "1.5"
