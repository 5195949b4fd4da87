"""The gRPC transport: an auth interceptor, a thin servicer and ONE table from errors to status codes.

Each RPC decodes its request through common.wire, calls the round coordinator and encodes the
reply. Known refusals become a status code with a message naming the problem (and a retry hint
when waiting helps); anything else is logged and reported as INTERNAL. The interceptor also
applies the per-caller call rates, and the streaming calls the per-device stream limit and the
watchdog of server/limits.py.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from fedpers import codec, wire
from fedpers.logsafe import clip
from fedpers.rpc import federation_pb2 as pb
from fedpers.rpc import federation_pb2_grpc as pb_grpc
from fedpers.server import errors
from fedpers.server.aggregate import AggregationError
from fedpers.server.journal import JournalError
from fedpers.server.limits import Limits, LimitsPolicy
from fedpers.server.metrics import ServerMetrics
from fedpers.server.rounds import Coordinator
from fedpers.server.state import StateUnavailable
from fedpers.store import MissingVersion
from fedpers.tls import ServerTls
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "fedpers.v1.Federation"
_PREFIX = f"/{SERVICE_NAME}/"
# Calls that need no session token: enrolling and joining (they prove a token or secret themselves).
UNAUTHENTICATED_METHODS = frozenset({f"{_PREFIX}Enroll", f"{_PREFIX}Join"})
# Calls an operator may make with the admin token instead of a device session.
ADMIN_METHODS = frozenset({f"{_PREFIX}GetStatus"})

# The one mapping from refusal kinds to gRPC status codes; first match wins (subclasses first).
ERROR_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.BadToken, grpc.StatusCode.UNAUTHENTICATED),
    (errors.Revoked, grpc.StatusCode.PERMISSION_DENIED),
    (errors.EnrollmentClosed, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NameTaken, grpc.StatusCode.ALREADY_EXISTS),
    (errors.TooManyDevices, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.StaleRound, grpc.StatusCode.FAILED_PRECONDITION),  # also NotSelected, StaleBase, AlreadyReported,
    # NotFinished (the choice exchange before the federation finished)
    (wire.Oversize, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.BadUpdate, grpc.StatusCode.INVALID_ARGUMENT),  # names, shapes, dtype, NaN/Inf, norm; LocalTensor
    (wire.WireError, grpc.StatusCode.INVALID_ARGUMENT),  # truncated, checksum, chunk order, malformed
    (codec.CodecError, grpc.StatusCode.INVALID_ARGUMENT),
    (AggregationError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.UnknownVersion, grpc.StatusCode.NOT_FOUND),
    (MissingVersion, grpc.StatusCode.NOT_FOUND),
    (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (errors.Busy, grpc.StatusCode.UNAVAILABLE),
    (JournalError, grpc.StatusCode.UNAVAILABLE),  # the update could not be made durable: retry later
    (StateUnavailable, grpc.StatusCode.UNAVAILABLE),  # the database (PostgreSQL) is unreachable: retry later
    (errors.RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.TooManyStreams, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.StreamCut, grpc.StatusCode.CANCELLED),  # the caller went away or was cut: INFO, not an error
)

# Every message a device sends is at most one chunk plus framing: anything larger is refused at the
# transport. What the server sends (chunks, tasks, a bounded status) stays within gRPC's default 4 MiB.
MAX_RECEIVE_BYTES = wire.MAX_CHUNK_SIZE + (64 << 10)
MAX_SEND_BYTES = 4 << 20


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    for kind, code in ERROR_STATUS:
        if isinstance(exc, kind):
            return code
    return None


def _abort(context: grpc.ServicerContext, exc: Exception, metrics: ServerMetrics | None, method: str) -> None:
    code = status_for(exc)
    if code is None:
        log.exception("unexpected error in %s", type(exc).__name__)
        if metrics is not None:
            metrics.errors.labels(method).inc()
        context.abort(grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__})")
    log.info("%s refused with %s: %s", method, code.name, clip(exc))  # the message may quote the caller
    if metrics is not None:
        metrics.refusals.labels(method, type(exc).__name__).inc()
    _refuse(context, code, type(exc).__name__, str(exc), getattr(exc, "retry_after", None))


MAX_DETAILS_CHARS = 2000  # a refusal message quoting the caller's input stays short


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, kind: str, message: str,
            retry_after: float | None = None) -> None:
    """Abort with `code`, the message "Kind: message", the kind (and a retry hint) as trailing metadata."""
    context.set_trailing_metadata(wire.refusal_metadata(kind, retry_after))
    context.abort(code, f"{kind}: {message[:MAX_DETAILS_CHARS]}")


def mapped_errors(fn: Callable) -> Callable:
    """Turn the refusals of ERROR_STATUS into status codes (works for streaming responses too), and
    time each call and count its refusals when the servicer has metrics."""
    method = fn.__name__
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(self: Any, request: Any, context: grpc.ServicerContext):
            t0 = time.perf_counter()
            self.coordinator.last_call = time.monotonic()
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped or reported as INTERNAL
                _abort(context, exc, self.metrics, method)
            finally:
                self.coordinator.last_call = time.monotonic()
                if self.metrics is not None:
                    self.metrics.calls.labels(method).observe(time.perf_counter() - t0)
        return gen

    @functools.wraps(fn)
    def call(self: Any, request: Any, context: grpc.ServicerContext):
        t0 = time.perf_counter()
        self.coordinator.last_call = time.monotonic()
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped or reported as INTERNAL
            _abort(context, exc, self.metrics, method)
        finally:
            self.coordinator.last_call = time.monotonic()
            if self.metrics is not None:
                self.metrics.calls.labels(method).observe(time.perf_counter() - t0)
    return call


def _device_id(context: grpc.ServicerContext) -> int:
    """The (already authenticated) caller's device id from the call metadata."""
    md = dict(context.invocation_metadata())
    return int(md[wire.DEVICE_KEY])


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks x-fedpers-device / x-fedpers-token on every Federation call except Enroll and Join;
    GetStatus also takes the admin token (x-fedpers-admin). Then spends one call of the caller's
    rate for the method (RESOURCE_EXHAUSTED with a retry hint when none is left)."""

    def __init__(self, coordinator: Coordinator, limits: Limits | None = None) -> None:
        self.coordinator = coordinator
        self.limits = limits or Limits()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(_PREFIX):
            return handler
        handler = _tolerant(handler)
        if method in UNAUTHENTICATED_METHODS:
            return handler
        md = dict(handler_call_details.invocation_metadata or ())
        name = method[len(_PREFIX):]
        try:
            if method in ADMIN_METHODS and wire.ADMIN_KEY in md:
                if not self.coordinator.identity.is_admin(md[wire.ADMIN_KEY]):
                    raise errors.BadToken("wrong admin token")
                self.limits.rates.take("admin", f"admin:{name}")
            else:
                device_id = self.coordinator.authenticate(md.get(wire.DEVICE_KEY), md.get(wire.TOKEN_KEY))
                self.limits.rates.take(device_id, name)
        except errors.FederationError as exc:
            code = status_for(exc) or grpc.StatusCode.UNAUTHENTICATED
            return _refusing_handler(handler, code, type(exc).__name__, str(exc), getattr(exc, "retry_after", None))
        return handler


class Undecodable:
    """A request whose bytes do not parse as the method's protobuf message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with a deserializer that never raises: bytes that are not the expected message
    become INVALID_ARGUMENT (MalformedMessage) in the servicer's table, instead of gRPC's own
    INTERNAL "Exception deserializing request!" and an ERROR with a traceback in the log."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: whatever the bytes were
            return Undecodable(f"{len(data)} bytes that are not a valid request message ({type(exc).__name__})")

    if handler.request_streaming:
        behavior = handler.stream_unary or handler.stream_stream
        field = "stream_unary" if handler.stream_unary else "stream_stream"

        def decoded(requests: Any) -> Any:
            for request in requests:
                if isinstance(request, Undecodable):
                    raise wire.MalformedMessage(f"a stream message: {request.reason}")
                yield request

        def stream_behavior(requests: Any, context: grpc.ServicerContext) -> Any:
            return behavior(decoded(requests), context)

        return handler._replace(request_deserializer=parse, **{field: stream_behavior})

    behavior = handler.unary_unary or handler.unary_stream
    field = "unary_unary" if handler.unary_unary else "unary_stream"

    def unary_behavior(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            log.info("refused with INVALID_ARGUMENT: %s", request.reason)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, wire.Refusal.MALFORMED_MESSAGE, request.reason)
        return behavior(request, context)

    return handler._replace(request_deserializer=parse, **{field: unary_behavior})


def _refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, kind: str, message: str,
                      retry_after: float | None = None) -> grpc.RpcMethodHandler:
    def refuse(request: Any, context: grpc.ServicerContext) -> None:
        _refuse(context, code, kind, message, retry_after)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class FederationServicer(pb_grpc.FederationServicer):
    """fedpers.v1.Federation: decode, call the coordinator, encode."""

    def __init__(self, coordinator: Coordinator, upload_slots: int = 3, metrics: ServerMetrics | None = None,
                 limits: Limits | None = None) -> None:
        self.coordinator = coordinator
        self.metrics = metrics
        self.limits = limits or Limits()
        # Uploads may take fewer handler threads than there are, so slow uploaders never leave
        # GetTask, GetStatus and downloads waiting; a device refused here retries with backoff.
        self.upload_slots = upload_slots
        self._uploads = threading.BoundedSemaphore(upload_slots)

    @mapped_errors
    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollReply:
        return wire.enroll_reply_to_proto(self.coordinator.enroll(wire.enroll_request_from_proto(request)))

    @mapped_errors
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        req = wire.join_request_from_proto(request)
        self.limits.rates.take(req.device_id, "Join")  # every Join writes the database
        return wire.join_reply_to_proto(self.coordinator.join(req))

    @mapped_errors
    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> pb.TaskReply:
        return wire.task_to_proto(self.coordinator.get_task(_device_id(context)))

    @mapped_errors
    def DownloadModel(self, request: pb.DownloadRequest, context: grpc.ServicerContext):
        req = wire.download_request_from_proto(request)
        device_id = _device_id(context)
        what = f"download of v{req.version} by device {device_id}"
        with self.limits.streams.enter(device_id, what), self.limits.watchdog.watch(context, what) as watched:
            blob, content = self.coordinator.download_blob(req.version, req.have_version)
            if not 0 <= req.offset <= len(blob):
                raise wire.MalformedMessage(f"offset {req.offset} is outside version {req.version} "
                                            f"({len(blob)} bytes)")
            for chunk in wire.chunk_blob(blob, start=req.offset, content=content):
                yield chunk  # returns once gRPC has sent it: a caller that stops reading stalls here
                watched.progress(len(chunk.data), self.limits.watchdog.clock())
                if self.metrics is not None:
                    self.metrics.download_bytes.inc(len(chunk.data))

    @mapped_errors
    def UploadUpdate(self, request_iterator, context: grpc.ServicerContext) -> pb.UploadReply:
        device_id = _device_id(context)
        what = f"upload from device {device_id}"
        with self.limits.streams.enter(device_id, what), self.limits.watchdog.watch(context, what) as watched:
            messages = self.limits.watchdog.iterate(watched, request_iterator, lambda m: m.ByteSize())
            # an upload slot is taken only for a valid header of an authenticated, selected device
            header, chunks = wire.split_upload(messages)
            self.coordinator.check_upload(device_id, header)
            if not self._uploads.acquire(blocking=False):
                raise errors.Busy(f"all {self.upload_slots} upload slots are in use; retry shortly", retry_after=0.5)
            try:
                reply = self.coordinator.accept_update(device_id, header, chunks)
                if self.metrics is not None:
                    self.metrics.updates_accepted.inc()
                    self.metrics.upload_bytes.inc(header.total_size)
                return wire.upload_reply_to_proto(reply)
            finally:
                self._uploads.release()

    @mapped_errors
    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        return wire.status_to_proto(self.coordinator.status())

    @mapped_errors
    def ReportChoice(self, request: pb.ChoiceRequest, context: grpc.ServicerContext) -> pb.ChoiceReply:
        req = wire.choice_request_from_proto(request)
        return wire.choice_reply_to_proto(self.coordinator.report_choice(_device_id(context), req))


def build_server(coordinator: Coordinator, listen: str, workers: int = 4, metrics: ServerMetrics | None = None,
                 tls: ServerTls | None = None,
                 limits: LimitsPolicy | None = None) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A gRPC server with the Federation and grpc.health.v1 services, bound to `listen` with TLS
    (plaintext when `tls` is None: the caller decided so explicitly) (port 0 picks a free port);
    returns (server, bound port, health servicer). Not started."""
    shared_limits = Limits(limits)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedpers-rpc"),
        interceptors=[AuthInterceptor(coordinator, shared_limits)],
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.experimental.tcp_max_read_chunk_size", 256 << 10),
            ("grpc.experimental.tcp_read_chunk_size", 64 << 10),
        ],
    )
    servicer = FederationServicer(coordinator, upload_slots=max(1, workers - 1), metrics=metrics,
                                  limits=shared_limits)
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not bind {listen}")
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer
