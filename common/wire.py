"""numpy and plain records <-> fedpers.v1 protobuf messages, and chunking of large blobs.

This is the one module (besides server/service.py and the client's stub use) that imports the
generated `*_pb2`. Every `x_to_proto` has an `x_from_proto`; tests round-trip each pair.
A blob (model or update) is a serialized TensorSet split into Chunks of at most 1 MiB; the
receiver checks offsets, the total size and the SHA-256 with `join_chunks`.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from fedpers import personalization as pers
from fedpers.rpc import federation_pb2 as pb
from google.protobuf.message import DecodeError

CHUNK_SIZE = 64 << 10  # bytes of blob per Chunk; see MAX_CHUNK_SIZE
# The server refuses larger messages, so this is all one connection can make it buffer per message.
# Measured with TLS (bench/server.py, 10 -> 200 concurrent devices uploading 4 MB): 1 MiB chunks let
# the server's peak RSS grow ~1 MiB per device (225 -> 414 MiB), 128 KiB +14%, 64 KiB flat (205 -> 207
# MiB), for ~15-30% fewer updates/s on loopback. (Plaintext stayed flat even at 1 MiB.)
MAX_CHUNK_SIZE = CHUNK_SIZE
INT63_MAX = (1 << 63) - 1  # ids, versions and sizes are positive int63: they fit SQLite's signed INTEGER

# Metadata keys every call except Enroll and Join carries (see proto/federation.proto).
DEVICE_KEY = "x-fedpers-device"
TOKEN_KEY = "x-fedpers-token"
ADMIN_KEY = "x-fedpers-admin"  # GetStatus from an operator: the server's admin token
# Trailing metadata of a refused call: the refusal's kind (a `Refusal` value), so callers match on a
# kind instead of the wording of a message, and when retrying later helps, after how many seconds.
REFUSAL_KEY = "x-fedpers-refusal"
RETRY_AFTER_KEY = "x-fedpers-retry-after"

# ---------------------------------------------------------------------------- field limits
# Every bound on a field the other side fills in, in one place. The server refuses a request that
# breaks one with MalformedMessage (INVALID_ARGUMENT) before anything is stored or logged.
MAX_NAME_CHARS = 64
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # device names: hostnames fit
MAX_SECRET_CHARS = 256  # enrollment token, device secret, session token, admin token, request id
MIN_REQUEST_ID_CHARS = 16
MAX_METRICS = 32  # metric keys per update (and per round in a status)
MAX_METRIC_KEY_CHARS = 64
METRIC_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
MAX_METRIC_ABS = 1e15  # finite metric values beyond this are refused (NaN/Inf are dropped, as before)
MAX_CODEC_CHARS = 64
MAX_VAL_EXAMPLES = 1 << 30  # a device's validation examples in a ChoiceRequest


class Refusal(enum.StrEnum):
    """Every kind of refusal the server sends in the `x-fedpers-refusal` trailing metadata."""

    BAD_TOKEN = "BadToken"
    STALE_ROUND = "StaleRound"
    NOT_SELECTED = "NotSelected"
    STALE_BASE = "StaleBase"
    ALREADY_REPORTED = "AlreadyReported"
    LATE_UPDATE = "LateUpdate"
    BAD_UPDATE = "BadUpdate"
    LOCAL_TENSOR = "LocalTensor"  # an update carried a tensor that stays on the device
    NOT_FINISHED = "NotFinished"  # the choice exchange before the federation finished
    UNKNOWN_VERSION = "UnknownVersion"
    MISSING_VERSION = "MissingVersion"
    SHUTTING_DOWN = "ShuttingDown"
    BUSY = "Busy"
    WIRE_ERROR = "WireError"
    MALFORMED_MESSAGE = "MalformedMessage"
    TRUNCATED_STREAM = "TruncatedStream"
    CHECKSUM_MISMATCH = "ChecksumMismatch"
    CHUNK_ORDER_ERROR = "ChunkOrderError"
    OVERSIZE = "Oversize"
    CODEC_ERROR = "CodecError"
    AGGREGATION_ERROR = "AggregationError"
    JOURNAL_ERROR = "JournalError"
    STATE_UNAVAILABLE = "StateUnavailable"  # the server's database is unreachable (PostgreSQL): retry later
    # identity and limits (issue 10)
    REVOKED = "Revoked"
    ENROLLMENT_CLOSED = "EnrollmentClosed"
    NAME_TAKEN = "NameTaken"
    TOO_MANY_DEVICES = "TooManyDevices"
    RATE_LIMITED = "RateLimited"
    TOO_MANY_STREAMS = "TooManyStreams"
    STREAM_CUT = "StreamCut"


def refusal_metadata(kind: Refusal | str, retry_after: float | None = None) -> tuple[tuple[str, str], ...]:
    """The trailing metadata the server attaches to a refused call (a kind outside `Refusal` is still
    sent; callers decode it as None, and a test keeps every server error kind in `Refusal`), with a
    retry hint in seconds when retrying later helps."""
    pairs = ((REFUSAL_KEY, str(kind)),)
    if retry_after is not None:
        pairs += ((RETRY_AFTER_KEY, f"{max(0.0, retry_after):.3f}"),)
    return pairs


def _trailing(error: object) -> tuple[tuple[str, str], ...]:
    trailing = getattr(error, "trailing_metadata", None)
    try:
        return tuple(trailing() or ()) if callable(trailing) else ()
    except Exception:  # noqa: BLE001 - a failed call without trailing metadata is simply not a refusal
        return ()


def retry_after_of(error: object) -> float | None:
    """The server's retry hint in seconds on a failed call (a grpc.RpcError), or None (capped at 60 s)."""
    for key, value in _trailing(error):
        if key == RETRY_AFTER_KEY:
            try:
                hint = float(value)
            except ValueError:
                return None
            return min(hint, 60.0) if math.isfinite(hint) and hint >= 0 else None
    return None


def refusal_of(error: object) -> Refusal | None:
    """The refusal kind a failed call carried (a grpc.RpcError), or None (not a refusal, or unknown kind)."""
    for key, value in _trailing(error):
        if key == REFUSAL_KEY:
            try:
                return Refusal(value)
            except ValueError:
                return None
    return None


class WireError(ValueError):
    """A message or stream from the other side is malformed; the message names the problem."""


class MalformedMessage(WireError):
    """A protobuf message or tensor field cannot be parsed or is inconsistent."""


class TruncatedStream(WireError):
    """A chunk stream ended before the announced total size."""


class ChecksumMismatch(WireError):
    """The SHA-256 of the received blob differs from the announced one."""


class ChunkOrderError(WireError):
    """A chunk's offset is not where the previous chunk ended (gap, overlap or reorder)."""


class Oversize(WireError):
    """A blob or chunk is larger than the receiver accepts."""


# ---------------------------------------------------------------------------- tensors

_DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.INT8: np.dtype("i1"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
    pb.UINT8: np.dtype("u1"),
}
_DTYPE_CODES: dict[np.dtype, int] = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}


def dtype_to_proto(dtype: np.dtype | type) -> int:
    """numpy dtype -> pb.DType code; raises MalformedMessage for dtypes the wire does not carry."""
    dt = np.dtype(dtype).newbyteorder("=")
    try:
        return _DTYPE_CODES[dt]
    except KeyError:
        known = sorted(map(str, _DTYPE_CODES))
        raise MalformedMessage(f"dtype {dt} is not carried on the wire; use one of {known}") from None


def dtype_from_proto(code: int) -> np.dtype:
    """pb.DType code -> native-order numpy dtype."""
    try:
        return _DTYPES[code].newbyteorder("=")
    except KeyError:
        raise MalformedMessage(f"unknown or unspecified tensor dtype code {code}") from None


@dataclass(frozen=True)
class WireTensor:
    """One named tensor as it travels: raw little-endian bytes of `dtype`, or a codec payload
    (then `codec` is set and `dtype` is the decoded dtype, float32)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    data: bytes
    codec: str = ""

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def to_array(self) -> np.ndarray:
        """The raw tensor as a writable native-order array (only for codec-less tensors)."""
        if self.codec:
            raise MalformedMessage(f"tensor {self.name!r} is {self.codec!r}-encoded; decode it with common.codec")
        wire_dt = _DTYPES[dtype_to_proto(self.dtype)]
        arr = np.frombuffer(self.data, dtype=wire_dt).reshape(self.shape)
        return arr.astype(wire_dt.newbyteorder("="), copy=True)


def array_to_wire(name: str, array: np.ndarray) -> WireTensor:
    """A numpy array -> raw WireTensor (little-endian C-order bytes)."""
    arr = np.asarray(array)
    code = dtype_to_proto(arr.dtype)
    wire_dt = _DTYPES[code]
    data = np.ascontiguousarray(arr, dtype=wire_dt).tobytes()
    return WireTensor(name=name, shape=tuple(int(d) for d in arr.shape), dtype=dtype_from_proto(code), data=data)


def encoded_to_wire(name: str, shape: tuple[int, ...], codec: str, payload: bytes) -> WireTensor:
    """A codec payload for a float32 array of `shape` -> WireTensor."""
    if not codec:
        raise MalformedMessage(f"tensor {name!r}: an encoded tensor needs a codec name")
    return WireTensor(name=name, shape=tuple(int(d) for d in shape), dtype=np.dtype(np.float32), data=bytes(payload),
                      codec=codec)


def tensor_to_proto(t: WireTensor) -> pb.Tensor:
    return pb.Tensor(name=t.name, shape=list(t.shape), dtype=dtype_to_proto(t.dtype), data=t.data, codec=t.codec)


def tensor_from_proto(msg: pb.Tensor) -> WireTensor:
    """pb.Tensor -> WireTensor, checking dtype, dims and (for raw tensors) the data length."""
    name = msg.name
    if not name:
        raise MalformedMessage("a tensor has an empty name")
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise MalformedMessage(f"tensor {name!r}: negative dimension in shape {shape}")
    try:
        dtype = dtype_from_proto(msg.dtype)
    except MalformedMessage as exc:
        raise MalformedMessage(f"tensor {name!r}: {exc}") from None
    t = WireTensor(name=name, shape=shape, dtype=dtype, data=bytes(msg.data), codec=msg.codec)
    if not t.codec and len(t.data) != t.size * dtype.itemsize:
        raise MalformedMessage(
            f"tensor {name!r}: {len(t.data)} data bytes, but shape {shape} of {dtype} needs {t.size * dtype.itemsize}"
        )
    return t


def tensorset_to_blob(tensors: Iterable[WireTensor]) -> bytes:
    """Serialize tensors (in the given order) into one TensorSet blob."""
    return pb.TensorSet(tensors=[tensor_to_proto(t) for t in tensors]).SerializeToString(deterministic=True)


def tensorset_from_blob(blob: bytes) -> list[WireTensor]:
    """Parse a TensorSet blob; refuses unparseable bytes and duplicate tensor names."""
    msg = pb.TensorSet()
    try:
        msg.ParseFromString(blob)
    except DecodeError as exc:
        raise MalformedMessage(f"blob is not a valid TensorSet ({len(blob)} bytes): {exc}") from None
    out = [tensor_from_proto(t) for t in msg.tensors]
    seen: set[str] = set()
    for t in out:
        if t.name in seen:
            raise MalformedMessage(f"tensor {t.name!r} occurs twice in one blob")
        seen.add(t.name)
    return out


def arrays_to_blob(arrays: Mapping[str, np.ndarray]) -> bytes:
    """dict of arrays -> TensorSet blob (raw tensors, sorted by name so equal dicts give equal bytes)."""
    return tensorset_to_blob(array_to_wire(name, arrays[name]) for name in sorted(arrays))


def arrays_from_blob(blob: bytes) -> dict[str, np.ndarray]:
    """TensorSet blob of raw tensors -> dict of writable native-order arrays."""
    return {t.name: t.to_array() for t in tensorset_from_blob(blob)}


# ---------------------------------------------------------------------------- chunks


def sha256(blob: bytes) -> bytes:
    return hashlib.sha256(blob).digest()


def chunk_blob(blob: bytes, chunk_size: int = CHUNK_SIZE, start: int = 0, content: str = "") -> Iterator[pb.Chunk]:
    """Split `blob` into Chunks from byte `start` on (for resumed downloads); each carries the
    total size, the digest of the whole blob and what the blob is (`content`). An empty blob is one
    empty chunk."""
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in (0, {MAX_CHUNK_SIZE}], got {chunk_size}")
    total = len(blob)
    if not 0 <= start <= total:
        raise ValueError(f"start offset {start} is outside the blob of {total} bytes")
    digest = sha256(blob)
    view = memoryview(blob)
    if total == 0 or start == total:
        yield pb.Chunk(offset=start, data=b"", total_size=total, sha256=digest, content=content)
        return
    for off in range(start, total, chunk_size):
        yield pb.Chunk(offset=off, data=bytes(view[off:off + chunk_size]), total_size=total, sha256=digest,
                       content=content)


def join_chunks(
    chunks: Iterable[pb.Chunk],
    expected_total: int | None = None,
    max_size: int = INT63_MAX,
    expected_sha256: bytes | None = None,
    received: bytes = b"",
) -> bytearray:
    """Reassemble a chunk stream into the blob (a bytearray, filled in place), verifying as it goes.

    `received` is a prefix already held (a resumed download): the stream must continue at its length.
    Raises Oversize (announced or actual size above `max_size`, or a chunk above 1 MiB),
    ChunkOrderError, TruncatedStream, ChecksumMismatch or MalformedMessage (inconsistent headers).
    """
    total: int | None = expected_total
    digest: bytes | None = expected_sha256
    buf: bytearray | None = None
    filled = len(received)
    hasher = hashlib.sha256(received)
    if total is not None:
        _check_total(total, max_size)  # refuse before reading anything
    n_chunks = 0
    for chunk in chunks:
        n_chunks += 1
        if total is None:
            total = chunk.total_size
        elif chunk.total_size != total:
            raise MalformedMessage(f"chunk {n_chunks} announces total size {chunk.total_size}, expected {total}")
        if buf is None:
            _check_total(total, max_size)
            if filled > total:
                raise ChunkOrderError(f"already hold {filled} bytes of a {total}-byte blob")
            buf = bytearray(total)  # allocated once: no regrowth while receiving
            buf[:filled] = received
        if digest is None:
            digest = chunk.sha256
        elif chunk.sha256 != digest:
            raise ChecksumMismatch(f"chunk {n_chunks} carries a different SHA-256 than announced")
        data = chunk.data
        if len(data) > MAX_CHUNK_SIZE:
            raise Oversize(f"chunk {n_chunks} holds {len(data)} bytes; at most {MAX_CHUNK_SIZE} are allowed")
        if chunk.offset != filled:
            raise ChunkOrderError(f"chunk {n_chunks} starts at byte {chunk.offset}, expected {filled}")
        if filled + len(data) > total:
            raise Oversize(f"stream carries more than the announced {total} bytes")
        buf[filled:filled + len(data)] = data
        hasher.update(data)
        filled += len(data)
    if total is None or buf is None:
        if total is not None:
            _check_total(total, max_size)
        raise TruncatedStream("the stream ended before any chunk arrived")
    if filled != total:
        raise TruncatedStream(f"the stream ended after {filled} of {total} bytes")
    if len(digest or b"") != 32:
        raise ChecksumMismatch(f"the announced SHA-256 has {len(digest or b'')} bytes, not 32")
    if hasher.digest() != digest:
        raise ChecksumMismatch(f"SHA-256 of the {total} received bytes does not match the announced digest")
    return buf


def _check_total(total: int, max_size: int) -> None:
    if total < 0:
        raise MalformedMessage(f"negative total size {total}")
    if total > max_size:
        raise Oversize(f"blob of {total} bytes exceeds the limit of {max_size} bytes")


# ---------------------------------------------------------------------------- metrics


def metrics_to_proto(target, metrics: Mapping[str, float]) -> None:
    """Fill a proto map<string, double> field (`target`) from a dict."""
    target.clear()
    for key, value in metrics.items():
        target[str(key)] = float(value)


def metrics_from_proto(source) -> dict[str, float]:
    return {str(k): float(v) for k, v in source.items()}


# ---------------------------------------------------------------------------- records


def check_device_name(name: str) -> str:
    """A device name is empty (no label) or 1-64 of [A-Za-z0-9._-] starting with a letter or digit."""
    if name and not NAME_PATTERN.fullmatch(name):
        shown = name[:MAX_NAME_CHARS].encode("unicode_escape").decode()
        raise MalformedMessage(f"device name must be 1-{MAX_NAME_CHARS} characters of A-Z a-z 0-9 . _ - "
                               f"starting with a letter or digit; got {len(name)} characters {shown!r}")
    return name


def check_secret_field(value: str, what: str) -> str:
    if len(value) > MAX_SECRET_CHARS or not value.isascii() or not value.isprintable():
        raise MalformedMessage(f"{what} must be at most {MAX_SECRET_CHARS} printable ASCII characters")
    return value


@dataclass(frozen=True)
class EnrollRequest:
    """First contact: the enrollment token (if the server needs one), a name, a random request id."""

    enroll_token: str
    device_name: str = ""
    request_id: str = ""


def enroll_request_to_proto(r: EnrollRequest) -> pb.EnrollRequest:
    return pb.EnrollRequest(enroll_token=r.enroll_token, device_name=r.device_name, request_id=r.request_id)


def enroll_request_from_proto(m: pb.EnrollRequest) -> EnrollRequest:
    """Refuses names outside NAME_PATTERN and oversized or short tokens/request ids (MalformedMessage)."""
    request_id = check_secret_field(m.request_id, "request_id")
    if len(request_id) < MIN_REQUEST_ID_CHARS:
        raise MalformedMessage(f"request_id must be a random string of at least {MIN_REQUEST_ID_CHARS} characters")
    return EnrollRequest(enroll_token=check_secret_field(m.enroll_token, "enroll_token"),
                         device_name=check_device_name(m.device_name), request_id=request_id)


@dataclass(frozen=True)
class EnrollReply:
    device_id: int
    device_secret: str

    def __repr__(self) -> str:  # never print the secret
        return f"EnrollReply(device_id={self.device_id}, device_secret=<hidden>)"


def enroll_reply_to_proto(r: EnrollReply) -> pb.EnrollReply:
    return pb.EnrollReply(device_id=r.device_id, device_secret=r.device_secret)


def enroll_reply_from_proto(m: pb.EnrollReply) -> EnrollReply:
    return EnrollReply(device_id=m.device_id, device_secret=m.device_secret)


@dataclass(frozen=True)
class JoinRequest:
    """A start of an enrolled device: its id and its long-term secret."""

    device_id: int
    device_secret: str

    def __repr__(self) -> str:
        return f"JoinRequest(device_id={self.device_id}, device_secret=<hidden>)"


def join_request_to_proto(r: JoinRequest) -> pb.JoinRequest:
    return pb.JoinRequest(device_id=r.device_id, device_secret=r.device_secret)


def join_request_from_proto(m: pb.JoinRequest) -> JoinRequest:
    return JoinRequest(device_id=m.device_id, device_secret=check_secret_field(m.device_secret, "device_secret"))


@dataclass(frozen=True)
class JoinReply:
    device_id: int
    session_token: str
    model_ini: str = ""  # the federation's model: the device checks its data against it at once

    def __repr__(self) -> str:
        return f"JoinReply(device_id={self.device_id}, session_token=<hidden>)"


def join_reply_to_proto(r: JoinReply) -> pb.JoinReply:
    return pb.JoinReply(device_id=r.device_id, session_token=r.session_token, model_ini=r.model_ini)


def join_reply_from_proto(m: pb.JoinReply) -> JoinReply:
    return JoinReply(device_id=m.device_id, session_token=m.session_token, model_ini=m.model_ini)


def hyperparams_to_proto(hp: pers.Hyperparams) -> pb.Personalization:
    return pb.Personalization(**hp.to_dict())


def hyperparams_from_proto(m: pb.Personalization) -> pers.Hyperparams:
    """The method (registered by name) and its hyperparameters, each checked against its range; a value
    for a hyperparameter the method does not take must be the neutral one it travels as. MalformedMessage
    otherwise (an unknown method, a value out of range)."""
    try:
        if not pers.NAME_PATTERN.fullmatch(m.method):
            raise pers.MethodError(f"method name must be 1-32 of a-z 0-9 _, got {m.method[:40]!r}")
        method = pers.get(m.method)
        taken = {p.name for p in method.params}
        values = {f.name: getattr(m, f.name) for f in dataclasses.fields(pers.Hyperparams) if f.name != "method"}
        hp = method.hyperparams({k: v for k, v in values.items() if k in taken})
    except pers.MethodError as exc:
        raise MalformedMessage(f"personalization: {exc}") from None
    neutral = pers.Hyperparams(method=m.method)
    odd = sorted(k for k, v in values.items() if k not in taken and v != getattr(neutral, k))
    if odd:
        raise MalformedMessage(f"personalization: {m.method} does not take {odd}")
    return hp


@dataclass(frozen=True)
class TrainingConfig:
    """What a device trains in a round (typed, not a dict)."""

    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.01
    shared_tensors: tuple[str, ...] = ()
    personal_layers: tuple[str, ...] = ()
    codec: str = "fp32"
    deadline_unix: float = 0.0
    dp_clip_norm: float = 0.0  # 0: no differential privacy
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 0.0  # the delta at which epsilon is reported (0 when DP is off)
    personalization: pers.Hyperparams | None = None  # the method and its hyperparameters; None: no method


def training_config_to_proto(c: TrainingConfig) -> pb.TrainingConfig:
    msg = pb.TrainingConfig(
        local_epochs=c.local_epochs, batch_size=c.batch_size, learning_rate=c.learning_rate,
        shared_tensors=list(c.shared_tensors), personal_layers=list(c.personal_layers), codec=c.codec,
        deadline_unix=c.deadline_unix, dp_clip_norm=c.dp_clip_norm, dp_noise_multiplier=c.dp_noise_multiplier,
        dp_delta=c.dp_delta,
    )
    if c.personalization is not None:
        msg.personalization.CopyFrom(hyperparams_to_proto(c.personalization))
    return msg


def training_config_from_proto(m: pb.TrainingConfig) -> TrainingConfig:
    return TrainingConfig(
        local_epochs=m.local_epochs, batch_size=m.batch_size, learning_rate=float(m.learning_rate),
        shared_tensors=tuple(m.shared_tensors), personal_layers=tuple(m.personal_layers), codec=m.codec,
        deadline_unix=m.deadline_unix, dp_clip_norm=m.dp_clip_norm, dp_noise_multiplier=m.dp_noise_multiplier,
        dp_delta=m.dp_delta,
        personalization=hyperparams_from_proto(m.personalization) if m.HasField("personalization") else None,
    )


class TaskKind(enum.IntEnum):
    WAIT = pb.TaskReply.WAIT
    TRAIN = pb.TaskReply.TRAIN
    DONE = pb.TaskReply.DONE


@dataclass(frozen=True)
class Task:
    """The reply to GetTask: wait, train round `round_id` from `base_version`, or stop."""

    kind: TaskKind
    round_id: int = 0
    base_version: int = 0
    config: TrainingConfig | None = None
    retry_after_seconds: float = 0.0
    model_ini: str = ""


def task_to_proto(t: Task) -> pb.TaskReply:
    msg = pb.TaskReply(kind=int(t.kind), round_id=t.round_id, base_version=t.base_version,
                       retry_after_seconds=t.retry_after_seconds, model_ini=t.model_ini)
    if t.config is not None:
        msg.config.CopyFrom(training_config_to_proto(t.config))
    return msg


def task_from_proto(m: pb.TaskReply) -> Task:
    return Task(
        kind=TaskKind(m.kind), round_id=m.round_id, base_version=m.base_version,
        config=training_config_from_proto(m.config) if m.HasField("config") else None,
        retry_after_seconds=float(m.retry_after_seconds), model_ini=m.model_ini,
    )


@dataclass(frozen=True)
class DownloadRequest:
    version: int
    offset: int = 0
    have_version: int | None = None  # the version the device holds: it may get only the steps since


def download_request_to_proto(r: DownloadRequest) -> pb.DownloadRequest:
    msg = pb.DownloadRequest(version=r.version, offset=r.offset)
    if r.have_version is not None:
        msg.have_version = r.have_version
    return msg


def download_request_from_proto(m: pb.DownloadRequest) -> DownloadRequest:
    return DownloadRequest(version=m.version, offset=m.offset,
                           have_version=m.have_version if m.HasField("have_version") else None)


STEPS = "steps"  # Chunk.content of a download whose blob is a ModelSteps


@dataclass(frozen=True)
class ModelSteps:
    """The compressed steps from `from_version` to `to_version` (oldest first) and the digest of the result."""

    from_version: int
    to_version: int
    steps: tuple[tuple[WireTensor, ...], ...]
    weights_sha256: bytes


def model_steps_to_blob(s: ModelSteps) -> bytes:
    msg = pb.ModelSteps(from_version=s.from_version, to_version=s.to_version, weights_sha256=s.weights_sha256,
                        steps=[pb.TensorSet(tensors=[tensor_to_proto(t) for t in step]) for step in s.steps])
    return msg.SerializeToString(deterministic=True)


def model_steps_from_blob(blob: bytes) -> ModelSteps:
    """Parse a ModelSteps blob; MalformedMessage when it is not one or its versions do not add up."""
    msg = pb.ModelSteps()
    try:
        msg.ParseFromString(blob)
    except DecodeError as exc:
        raise MalformedMessage(f"blob is not a valid ModelSteps ({len(blob)} bytes): {exc}") from None
    if not 0 <= msg.from_version < msg.to_version or len(msg.steps) != msg.to_version - msg.from_version:
        raise MalformedMessage(f"steps from version {msg.from_version} to {msg.to_version} with "
                               f"{len(msg.steps)} steps do not add up")
    return ModelSteps(from_version=msg.from_version, to_version=msg.to_version,
                      weights_sha256=bytes(msg.weights_sha256),
                      steps=tuple(tuple(tensor_from_proto(t) for t in step.tensors) for step in msg.steps))


@dataclass(frozen=True)
class UpdateHeader:
    """First message of an upload: which round and base, how many examples, and the blob's size and digest."""

    round_id: int
    base_version: int
    num_examples: int
    total_size: int
    sha256: bytes
    codec: str = "fp32"
    metrics: dict[str, float] = field(default_factory=dict)


def update_header_to_proto(h: UpdateHeader) -> pb.UpdateHeader:
    msg = pb.UpdateHeader(round_id=h.round_id, base_version=h.base_version, num_examples=h.num_examples,
                          codec=h.codec, total_size=h.total_size, sha256=h.sha256)
    metrics_to_proto(msg.metrics, h.metrics)
    return msg


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A device's metrics within the limits: at most MAX_METRICS keys of METRIC_KEY_PATTERN, finite values
    within +-MAX_METRIC_ABS (NaN/Inf values are left for the server to drop, as a diverged loss can be)."""
    if len(metrics) > MAX_METRICS:
        raise MalformedMessage(f"{len(metrics)} metrics; at most {MAX_METRICS} are accepted")
    for key, value in metrics.items():
        if not METRIC_KEY_PATTERN.fullmatch(key):
            shown = key[:MAX_METRIC_KEY_CHARS].encode("unicode_escape").decode()
            raise MalformedMessage(f"metric key {shown!r} ({len(key)} characters) must be 1-{MAX_METRIC_KEY_CHARS} "
                                   "of A-Z a-z 0-9 _ . : / -")
        if math.isfinite(value) and abs(value) > MAX_METRIC_ABS:
            raise MalformedMessage(f"metric {key!r} = {value:g} is beyond +-{MAX_METRIC_ABS:g}")
    return dict(metrics)


def update_header_from_proto(m: pb.UpdateHeader) -> UpdateHeader:
    """The header of an upload, refusing metrics or a codec name beyond the field limits."""
    if len(m.codec) > MAX_CODEC_CHARS:
        raise MalformedMessage(f"codec name of {len(m.codec)} characters; at most {MAX_CODEC_CHARS}")
    return UpdateHeader(round_id=m.round_id, base_version=m.base_version, num_examples=m.num_examples,
                        total_size=m.total_size, sha256=bytes(m.sha256), codec=m.codec,
                        metrics=check_metrics(metrics_from_proto(m.metrics)))


def upload_messages(header: UpdateHeader, blob: bytes, chunk_size: int = CHUNK_SIZE) -> Iterator[pb.UploadMessage]:
    """The client side of UploadUpdate: the header, then the blob's chunks."""
    yield pb.UploadMessage(header=update_header_to_proto(header))
    for chunk in chunk_blob(blob, chunk_size):
        yield pb.UploadMessage(chunk=chunk)


def split_upload(messages: Iterable[pb.UploadMessage]) -> tuple[UpdateHeader, Iterator[pb.Chunk]]:
    """The server side of UploadUpdate: the header and an iterator over the chunks that follow.

    Raises TruncatedStream if the stream is empty, MalformedMessage if it does not start with a header
    or carries a second header later."""
    it = iter(messages)
    first = next(it, None)
    if first is None:
        raise TruncatedStream("the upload stream ended before its header")
    if first.WhichOneof("msg") != "header":
        raise MalformedMessage("an upload must start with an UpdateHeader")
    header = update_header_from_proto(first.header)

    def chunks() -> Iterator[pb.Chunk]:
        for msg in it:
            if msg.WhichOneof("msg") != "chunk":
                raise MalformedMessage("an upload carries exactly one header, first")
            yield msg.chunk

    return header, chunks()


@dataclass(frozen=True)
class UploadReply:
    accepted: bool
    message: str = ""
    updates_in_round: int = 0


def upload_reply_to_proto(r: UploadReply) -> pb.UploadReply:
    return pb.UploadReply(accepted=r.accepted, message=r.message, updates_in_round=r.updates_in_round)


def upload_reply_from_proto(m: pb.UploadReply) -> UploadReply:
    return UploadReply(accepted=m.accepted, message=m.message, updates_in_round=m.updates_in_round)


@dataclass(frozen=True)
class ChoiceRequest:
    """A device's validation accuracy of each candidate it could serve, after the federation (version)."""

    version: int
    val_accuracy: dict[str, float]
    val_examples: int


def choice_request_to_proto(r: ChoiceRequest) -> pb.ChoiceRequest:
    msg = pb.ChoiceRequest(version=r.version, val_examples=r.val_examples)
    for k, v in r.val_accuracy.items():
        msg.val_accuracy[k] = v
    return msg


def choice_request_from_proto(m: pb.ChoiceRequest) -> ChoiceRequest:
    """Refuses (MalformedMessage) a candidate outside CANDIDATES, an accuracy outside [0, 1] or not finite,
    validation examples outside [0, MAX_VAL_EXAMPLES] and a negative version. A device without validation
    examples sends none and no scores: it only asks for the fleet default."""
    acc = dict(m.val_accuracy)
    unknown = sorted(k for k in acc if k not in pers.CANDIDATES)
    if unknown:
        shown = [k[:MAX_METRIC_KEY_CHARS] for k in unknown[:4]]
        raise MalformedMessage(f"val_accuracy names candidates among {list(pers.CANDIDATES)}, got {shown}")
    bad = sorted(k for k, v in acc.items() if not (math.isfinite(v) and 0.0 <= v <= 1.0))
    if bad:
        raise MalformedMessage(f"val_accuracy of {bad} is not an accuracy in [0, 1]")
    if not 0 <= m.val_examples <= MAX_VAL_EXAMPLES:
        raise MalformedMessage(f"val_examples must be in [0, {MAX_VAL_EXAMPLES}], got {m.val_examples}")
    if (m.val_examples == 0) != (not acc):
        raise MalformedMessage(f"{m.val_examples} validation examples with {len(acc)} scores: scores need "
                               "validation examples, and validation examples give scores")
    if not 0 <= m.version <= INT63_MAX:
        raise MalformedMessage(f"version must be >= 0, got {m.version}")
    return ChoiceRequest(version=m.version, val_accuracy=acc, val_examples=m.val_examples)


@dataclass(frozen=True)
class ChoiceReply:
    """Whether the fleet default is decided yet, and what it is."""

    decided: bool
    fleet_default: str = ""
    retry_after_seconds: float = 0.0
    reported: int = 0
    expected: int = 0


def choice_reply_to_proto(r: ChoiceReply) -> pb.ChoiceReply:
    return pb.ChoiceReply(decided=r.decided, fleet_default=r.fleet_default, retry_after_seconds=r.retry_after_seconds,
                          reported=r.reported, expected=r.expected)


def choice_reply_from_proto(m: pb.ChoiceReply) -> ChoiceReply:
    """Refuses a decided reply whose default is not a candidate (MalformedMessage)."""
    if m.decided and m.fleet_default not in pers.CANDIDATES:
        raise MalformedMessage(f"fleet_default must be one of {list(pers.CANDIDATES)}, got "
                               f"{m.fleet_default[:MAX_METRIC_KEY_CHARS]!r}")
    retry = float(m.retry_after_seconds)
    return ChoiceReply(decided=m.decided, fleet_default=m.fleet_default if m.decided else "",
                       retry_after_seconds=min(max(retry, 0.0), 60.0) if math.isfinite(retry) else 1.0,
                       reported=m.reported, expected=m.expected)


@dataclass(frozen=True)
class RoundSummary:
    round_id: int
    version: int = 0
    state: str = "open"
    devices: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    late_updates: int = 0  # refused because they came after the round closed


def round_summary_to_proto(r: RoundSummary) -> pb.RoundSummary:
    msg = pb.RoundSummary(round_id=r.round_id, version=r.version, state=r.state, devices=r.devices,
                          late_updates=r.late_updates)
    metrics_to_proto(msg.metrics, r.metrics)
    return msg


def round_summary_from_proto(m: pb.RoundSummary) -> RoundSummary:
    return RoundSummary(round_id=m.round_id, version=m.version, state=m.state, devices=m.devices,
                        metrics=metrics_from_proto(m.metrics), late_updates=m.late_updates)


@dataclass(frozen=True)
class Status:
    """Progress of the federation, as GetStatus reports it."""

    version: int = 0
    current_round: int = 0
    round_state: str = ""
    rounds_completed: int = 0
    rounds_target: int = 0
    devices_joined: int = 0
    finished: bool = False
    rounds: tuple[RoundSummary, ...] = ()
    problem: str = ""  # why the server cannot make progress right now; empty when all is well
    late_updates: int = 0  # updates refused because their round had closed, over all rounds


def status_to_proto(s: Status) -> pb.StatusReply:
    return pb.StatusReply(
        version=s.version, current_round=s.current_round, round_state=s.round_state,
        rounds_completed=s.rounds_completed, rounds_target=s.rounds_target, devices_joined=s.devices_joined,
        finished=s.finished, rounds=[round_summary_to_proto(r) for r in s.rounds], problem=s.problem,
        late_updates=s.late_updates,
    )


def status_from_proto(m: pb.StatusReply) -> Status:
    return Status(
        version=m.version, current_round=m.current_round, round_state=m.round_state,
        rounds_completed=m.rounds_completed, rounds_target=m.rounds_target, devices_joined=m.devices_joined,
        finished=m.finished, rounds=tuple(round_summary_from_proto(r) for r in m.rounds), problem=m.problem,
        late_updates=m.late_updates,
    )


def status_to_json(s: Status) -> str:
    """A Status as JSON (what `fedpers-server status --json` prints)."""
    return json.dumps(dataclasses.asdict(s), indent=2, sort_keys=True)


def status_from_json(text: str) -> Status:
    """The inverse of status_to_json; MalformedMessage when the text is not a Status."""
    try:
        data = json.loads(text)
        data["rounds"] = tuple(RoundSummary(**r) for r in data.get("rounds", ()))
        return Status(**data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise MalformedMessage(f"not a status JSON object: {exc}") from None


def auth_metadata(device_id: int, token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates a device (every RPC except Enroll and Join)."""
    return ((DEVICE_KEY, str(int(device_id))), (TOKEN_KEY, token))


def admin_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata of an operator's GetStatus: the server's admin token."""
    return ((ADMIN_KEY, token),)
