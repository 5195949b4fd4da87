from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
INT8: DType
INT32: DType
INT64: DType
UINT8: DType

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "data", "codec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    codec: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ..., codec: _Optional[str] = ...) -> None: ...

class TensorSet(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "sha256", "content")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    sha256: bytes
    content: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., content: _Optional[str] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("enroll_token", "device_name", "request_id")
    ENROLL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    enroll_token: str
    device_name: str
    request_id: str
    def __init__(self, enroll_token: _Optional[str] = ..., device_name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("device_id", "device_secret")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECRET_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    device_secret: str
    def __init__(self, device_id: _Optional[int] = ..., device_secret: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("device_id", "device_secret")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECRET_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    device_secret: str
    def __init__(self, device_id: _Optional[int] = ..., device_secret: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("device_id", "session_token", "model_ini")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_INI_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    session_token: str
    model_ini: str
    def __init__(self, device_id: _Optional[int] = ..., session_token: _Optional[str] = ..., model_ini: _Optional[str] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("local_epochs", "batch_size", "learning_rate", "shared_tensors", "personal_layers", "codec", "deadline_unix", "dp_clip_norm", "dp_noise_multiplier", "dp_delta", "personalization")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SHARED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZATION_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    batch_size: int
    learning_rate: float
    shared_tensors: _containers.RepeatedScalarFieldContainer[str]
    personal_layers: _containers.RepeatedScalarFieldContainer[str]
    codec: str
    deadline_unix: float
    dp_clip_norm: float
    dp_noise_multiplier: float
    dp_delta: float
    personalization: Personalization
    def __init__(self, local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., shared_tensors: _Optional[_Iterable[str]] = ..., personal_layers: _Optional[_Iterable[str]] = ..., codec: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., dp_clip_norm: _Optional[float] = ..., dp_noise_multiplier: _Optional[float] = ..., dp_delta: _Optional[float] = ..., personalization: _Optional[_Union[Personalization, _Mapping]] = ...) -> None: ...

class Personalization(_message.Message):
    __slots__ = ("method", "mu", "lam", "personal_epochs", "head_epochs", "body_epochs", "head_depth", "ft_epochs", "ft_scope", "val_fraction")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    LAM_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    HEAD_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BODY_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DEPTH_FIELD_NUMBER: _ClassVar[int]
    FT_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    FT_SCOPE_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    method: str
    mu: float
    lam: float
    personal_epochs: int
    head_epochs: int
    body_epochs: int
    head_depth: int
    ft_epochs: int
    ft_scope: str
    val_fraction: float
    def __init__(self, method: _Optional[str] = ..., mu: _Optional[float] = ..., lam: _Optional[float] = ..., personal_epochs: _Optional[int] = ..., head_epochs: _Optional[int] = ..., body_epochs: _Optional[int] = ..., head_depth: _Optional[int] = ..., ft_epochs: _Optional[int] = ..., ft_scope: _Optional[str] = ..., val_fraction: _Optional[float] = ...) -> None: ...

class TaskReply(_message.Message):
    __slots__ = ("kind", "round_id", "base_version", "config", "retry_after_seconds", "model_ini")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[TaskReply.Kind]
        TRAIN: _ClassVar[TaskReply.Kind]
        DONE: _ClassVar[TaskReply.Kind]
    WAIT: TaskReply.Kind
    TRAIN: TaskReply.Kind
    DONE: TaskReply.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_INI_FIELD_NUMBER: _ClassVar[int]
    kind: TaskReply.Kind
    round_id: int
    base_version: int
    config: TrainingConfig
    retry_after_seconds: float
    model_ini: str
    def __init__(self, kind: _Optional[_Union[TaskReply.Kind, str]] = ..., round_id: _Optional[int] = ..., base_version: _Optional[int] = ..., config: _Optional[_Union[TrainingConfig, _Mapping]] = ..., retry_after_seconds: _Optional[float] = ..., model_ini: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("version", "offset", "have_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    offset: int
    have_version: int
    def __init__(self, version: _Optional[int] = ..., offset: _Optional[int] = ..., have_version: _Optional[int] = ...) -> None: ...

class ModelSteps(_message.Message):
    __slots__ = ("from_version", "to_version", "steps", "weights_sha256")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    to_version: int
    steps: _containers.RepeatedCompositeFieldContainer[TensorSet]
    weights_sha256: bytes
    def __init__(self, from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[TensorSet, _Mapping]]] = ..., weights_sha256: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round_id", "base_version", "num_examples", "metrics", "codec", "total_size", "sha256")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    base_version: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    codec: str
    total_size: int
    sha256: bytes
    def __init__(self, round_id: _Optional[int] = ..., base_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., codec: _Optional[str] = ..., total_size: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "message", "updates_in_round")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_IN_ROUND_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    updates_in_round: int
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., updates_in_round: _Optional[int] = ...) -> None: ...

class ChoiceRequest(_message.Message):
    __slots__ = ("version", "val_accuracy", "val_examples")
    class ValAccuracyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    version: int
    val_accuracy: _containers.ScalarMap[str, float]
    val_examples: int
    def __init__(self, version: _Optional[int] = ..., val_accuracy: _Optional[_Mapping[str, float]] = ..., val_examples: _Optional[int] = ...) -> None: ...

class ChoiceReply(_message.Message):
    __slots__ = ("decided", "fleet_default", "retry_after_seconds", "reported", "expected")
    DECIDED_FIELD_NUMBER: _ClassVar[int]
    FLEET_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    decided: bool
    fleet_default: str
    retry_after_seconds: float
    reported: int
    expected: int
    def __init__(self, decided: _Optional[bool] = ..., fleet_default: _Optional[str] = ..., retry_after_seconds: _Optional[float] = ..., reported: _Optional[int] = ..., expected: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round_id", "version", "state", "devices", "metrics", "late_updates")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LATE_UPDATES_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    version: int
    state: str
    devices: int
    metrics: _containers.ScalarMap[str, float]
    late_updates: int
    def __init__(self, round_id: _Optional[int] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., devices: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., late_updates: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "current_round", "round_state", "rounds_completed", "rounds_target", "devices_joined", "finished", "rounds", "problem", "late_updates")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_STATE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TARGET_FIELD_NUMBER: _ClassVar[int]
    DEVICES_JOINED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    LATE_UPDATES_FIELD_NUMBER: _ClassVar[int]
    version: int
    current_round: int
    round_state: str
    rounds_completed: int
    rounds_target: int
    devices_joined: int
    finished: bool
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    problem: str
    late_updates: int
    def __init__(self, version: _Optional[int] = ..., current_round: _Optional[int] = ..., round_state: _Optional[str] = ..., rounds_completed: _Optional[int] = ..., rounds_target: _Optional[int] = ..., devices_joined: _Optional[int] = ..., finished: _Optional[bool] = ..., rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ..., problem: _Optional[str] = ..., late_updates: _Optional[int] = ...) -> None: ...
