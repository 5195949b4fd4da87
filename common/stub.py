"""The caller's side of fedpers.v1: one channel and typed calls that take and return `fedpers.wire` records.

The device agent, the simulator, `fedpers-server status|health`, the Docker fleet check and the
benchmarks all reach a server through `FederationClient`; with `wire.py` and the server's servicer
this is the only code that touches the generated stubs. Its `TlsConfig` says how the channel is
secured (the CA to trust, an optional client certificate); plaintext only when it says `insecure`.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType

import grpc
from fedpers import wire
from fedpers.rpc import federation_pb2 as pb
from fedpers.rpc import federation_pb2_grpc as pb_grpc
from fedpers.tls import TlsConfig, open_channel

DEFAULT_TIMEOUT = 60.0
# gRPC's own reconnect backoff grows to 120 s by default: a device would then sit idle for up to
# two minutes after a server restart or a cut link. Callers retry with fedpers.backoff anyway, so
# the channel reconnects within a few seconds.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 3000),
)


class FederationClient:
    """A channel to one server. `join()` stores the session, later calls send it as metadata.

    `tls` None means TLS trusting the system's CAs; `TlsConfig.plaintext()` is the only way to plaintext."""

    def __init__(self, address: str, *, tls: TlsConfig | None = None, timeout: float = DEFAULT_TIMEOUT,
                 admin_token: str = "", channel: grpc.Channel | None = None) -> None:
        """`admin_token`: the server's admin token, sent with GetStatus instead of a device session.
        `channel`: an open channel to call through (see `sibling`); closing this client leaves it open."""
        self.address = address
        self.timeout = timeout
        self.tls = tls or TlsConfig()
        self._admin = admin_token
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else open_channel(address, self.tls, CHANNEL_OPTIONS)
        self._stub = pb_grpc.FederationStub(self.channel)
        self.device_id: int | None = None
        self._token = ""

    def sibling(self) -> FederationClient:
        """Another client on this one's channel with a session of its own: the many virtual devices of a
        simulator host share one connection, each still calling as itself (its own id, token and rate
        limits). Closing a sibling leaves the channel open; closing this client closes it."""
        return FederationClient(self.address, tls=self.tls, timeout=self.timeout, channel=self.channel)

    # -- session

    def set_session(self, device_id: int, token: str) -> None:
        self.device_id, self._token = device_id, token

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.device_id is None:
            raise RuntimeError("call join() before calls that need a session")
        return wire.auth_metadata(self.device_id, self._token)

    # -- calls

    def enroll(self, request: wire.EnrollRequest, timeout: float | None = None) -> wire.EnrollReply:
        """First contact: the device's id and long-term secret (keep it private; join() with it)."""
        return wire.enroll_reply_from_proto(
            self._stub.Enroll(wire.enroll_request_to_proto(request), timeout=timeout or self.timeout))

    def join(self, request: wire.JoinRequest, timeout: float | None = None) -> wire.JoinReply:
        """Prove the device secret; the session token it returns goes with every later call."""
        reply = wire.join_reply_from_proto(
            self._stub.Join(wire.join_request_to_proto(request), timeout=timeout or self.timeout))
        self.set_session(reply.device_id, reply.session_token)
        return reply

    def get_task(self, timeout: float | None = None) -> wire.Task:
        return wire.task_from_proto(self._stub.GetTask(pb.TaskRequest(), metadata=self._metadata(),
                                                       timeout=timeout or self.timeout))

    def download(self, request: wire.DownloadRequest, timeout: float | None = None) -> Iterator[pb.Chunk]:
        """The chunk stream of a model version (from `request.offset`); `wire.join_chunks` checks it."""
        return self._stub.DownloadModel(wire.download_request_to_proto(request), metadata=self._metadata(),
                                        timeout=timeout or self.timeout)

    def upload(self, header: wire.UpdateHeader, blob: bytes, timeout: float | None = None) -> wire.UploadReply:
        reply = self._stub.UploadUpdate(wire.upload_messages(header, blob), metadata=self._metadata(),
                                        timeout=timeout or self.timeout)
        return wire.upload_reply_from_proto(reply)

    def status(self, timeout: float | None = None) -> wire.Status:
        """GetStatus as the operator (admin token) or as the joined device."""
        md = wire.admin_metadata(self._admin) if self._admin else self._metadata()
        return wire.status_from_proto(self._stub.GetStatus(pb.StatusRequest(), metadata=md,
                                                           timeout=timeout or self.timeout))

    def report_choice(self, request: wire.ChoiceRequest, timeout: float | None = None) -> wire.ChoiceReply:
        """After the federation: this device's validation scores; the reply says the fleet default once decided."""
        return wire.choice_reply_from_proto(self._stub.ReportChoice(wire.choice_request_to_proto(request),
                                                                    metadata=self._metadata(),
                                                                    timeout=timeout or self.timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 serving status name (SERVING, NOT_SERVING, ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # -- lifetime

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> FederationClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def get_status(address: str, tls: TlsConfig | None = None, admin_token: str = "", timeout: float = 5.0) -> wire.Status:
    """One GetStatus call as the operator on a fresh channel (grpc.RpcError when the server does not answer)."""
    with FederationClient(address, tls=tls, timeout=timeout, admin_token=admin_token) as client:
        return client.status()
