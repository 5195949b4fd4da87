"""Shared fakes for the server tests: a tiny model layout, update blobs, a fake clock and a test PKI.

Servers in tests speak TLS with a throwaway CA made once per test session (`pki()`); a test that
is about plaintext says `--insecure` / `TlsConfig.plaintext()` itself.
"""

from __future__ import annotations

import atexit
import functools
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedpers import codec, wire
from fedpers.rpc import federation_pb2 as pb
from fedpers.rpc import federation_pb2_grpc as pb_grpc
from fedpers.server import aggregate as ag
from fedpers.server import state as st
from fedpers.server.model import layout_from_specs
from fedpers.server.rounds import Coordinator, RoundPolicy
from fedpers.tls import TlsConfig, open_channel

INI = "[input]\ntype = input\ninput_shape = 1:1:4\n"


@functools.cache
def pki():
    """The session's throwaway CA, server certificate (localhost, 127.0.0.1) and a client certificate."""
    from fedpers.pki import make_dev_pki

    directory = Path(tempfile.mkdtemp(prefix="fedpers-test-pki-"))
    atexit.register(shutil.rmtree, directory, True)
    return make_dev_pki(directory / "tls", clients=("device",))


def client_tls() -> TlsConfig:
    """What a test device trusts: the session's CA."""
    return TlsConfig(ca=pki().ca_cert)


def server_tls() -> dict[str, Path]:
    """ServerConfig fields for TLS with the session's server certificate."""
    return {"tls_cert": pki().server_cert, "tls_key": pki().server_key}


def server_tls_args() -> list[str]:
    """The same as fedpers-server flags."""
    return ["--tls-cert", str(pki().server_cert), "--tls-key", str(pki().server_key)]


def client_tls_args() -> list[str]:
    return ["--tls-ca", str(pki().ca_cert)]


@dataclass
class FakeSpec:
    name: str
    layer: str
    shape: tuple[int, ...]
    trainable: bool
    personal: bool


SPECS = {
    "fc1.weight": FakeSpec("fc1.weight", "fc1", (4, 3), True, False),
    "fc1.bias": FakeSpec("fc1.bias", "fc1", (3,), True, False),
    "emb.weight": FakeSpec("emb.weight", "emb", (2, 2), False, False),  # frozen: served, never updated
    "head.weight": FakeSpec("head.weight", "head", (3, 2), True, True),  # personal: never on the server
}
LAYOUT = layout_from_specs(INI, SPECS)


def initial_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s.shape).astype(np.float32) for n, s in SPECS.items()}


def random_delta(seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in LAYOUT.shared_shapes.items()}


def update_blob(delta: dict[str, np.ndarray], codec_name: str = "fp32") -> bytes:
    tensors = []
    for name, arr in delta.items():
        if codec_name:
            payload, _ = codec.encode(codec_name, arr)
            tensors.append(wire.encoded_to_wire(name, arr.shape, codec_name, payload))
        else:
            tensors.append(wire.array_to_wire(name, arr))
    return wire.tensorset_to_blob(tensors)


def header(task: wire.Task, blob: bytes, num_examples: int = 10, **metrics: float) -> wire.UpdateHeader:
    return wire.UpdateHeader(round_id=task.round_id, base_version=task.base_version, num_examples=num_examples,
                             total_size=len(blob), sha256=wire.sha256(blob), codec="fp32", metrics=dict(metrics))


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_coordinator(store_dir, state=None, clock=None, strategy="fedavg", identity=None, training=None,
                     **policy) -> Coordinator:
    """A coordinator over the fake layout; enrollment needs "enroll-me" unless `identity` says otherwise."""
    from fedpers.store import ModelStore

    # gather_seconds=0: a round opens as soon as min_devices wait (tests of the gather window set it)
    defaults = dict(rounds=3, min_devices=2, fraction=1.0, round_timeout=60.0, gather_seconds=0.0)
    defaults.update(policy)
    return Coordinator(
        state=state if state is not None else st.MemoryState(),
        store=ModelStore(store_dir),
        layout=LAYOUT,
        initial_weights=initial_weights(),
        aggregator=ag.WeightedMean(),
        optimizer=ag.make_optimizer(strategy),
        policy=RoundPolicy(**defaults),
        training=training or wire.TrainingConfig(local_epochs=2, batch_size=8, learning_rate=0.05, codec="fp32"),
        enroll_token="enroll-me",
        identity=identity,
        clock=clock or Clock(),
    )


class Device:
    """A minimal test device speaking the protocol directly: Enroll, then Join with the secret."""

    def __init__(self, address: str, name: str, enroll: str = "enroll-me", tls: TlsConfig | None = None,
                 credentials: tuple[int, str] | None = None) -> None:
        """`credentials` (id, secret) of an enrolled device: join with them instead of enrolling."""
        self.address, self.tls = address, tls or client_tls()
        self.channel = open_channel(address, self.tls)
        self.stub = pb_grpc.FederationStub(self.channel)
        if credentials is None:
            request = wire.EnrollRequest(enroll, name, request_id=secrets.token_urlsafe(16))
            reply = wire.enroll_reply_from_proto(self.stub.Enroll(wire.enroll_request_to_proto(request), timeout=10))
            credentials = (reply.device_id, reply.device_secret)
        self.id, self.secret = credentials
        self.join()

    def join(self) -> None:
        req = wire.join_request_to_proto(wire.JoinRequest(self.id, self.secret))
        self.token = wire.join_reply_from_proto(self.stub.Join(req, timeout=10)).session_token

    @property
    def credentials(self) -> tuple[int, str]:
        return self.id, self.secret

    def secrets(self) -> tuple[bytes, ...]:
        """Every secret this device holds (none may ever be seen on the wire)."""
        return self.token.encode(), self.secret.encode()

    @property
    def md(self):
        return wire.auth_metadata(self.id, self.token)

    def task(self) -> wire.Task:
        return wire.task_from_proto(self.stub.GetTask(pb.TaskRequest(), metadata=self.md, timeout=10))

    def status(self) -> wire.Status:
        return wire.status_from_proto(self.stub.GetStatus(pb.StatusRequest(), metadata=self.md, timeout=10))

    def download(self, version: int) -> dict[str, np.ndarray]:
        chunks = self.stub.DownloadModel(pb.DownloadRequest(version=version), metadata=self.md, timeout=10)
        return wire.arrays_from_blob(wire.join_chunks(chunks))

    def upload(self, messages) -> wire.UploadReply:
        return wire.upload_reply_from_proto(self.stub.UploadUpdate(iter(list(messages)), metadata=self.md,
                                                                   timeout=10))

    def close(self) -> None:
        self.channel.close()


def join_device(c: Coordinator, enroll_token: str, name: str) -> wire.JoinReply:
    """Enroll a device at the coordinator and start its session (what the agent does on first start)."""
    enrolled = c.enroll(wire.EnrollRequest(enroll_token, name, request_id=f"request-of-{name}-0123456789"))
    return c.join(wire.JoinRequest(enrolled.device_id, enrolled.device_secret))
