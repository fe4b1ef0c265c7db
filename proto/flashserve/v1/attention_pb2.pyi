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
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_UNSPECIFIED: _ClassVar[Operation]
    FORWARD: _ClassVar[Operation]
    BACKWARD: _ClassVar[Operation]
DTYPE_UNSPECIFIED: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT32: DType
FLOAT64: DType
INT32: DType
INT64: DType
UINT8: DType
BOOL: DType
OPERATION_UNSPECIFIED: Operation
FORWARD: Operation
BACKWARD: Operation

class ShmSlice(_message.Message):
    __slots__ = ("region", "offset")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class TensorDesc(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "shm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    shm: ShmSlice
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., shm: _Optional[_Union[ShmSlice, _Mapping]] = ...) -> None: ...

class AttentionParams(_message.Message):
    __slots__ = ("softmax_scale", "causal", "window_left", "window_right", "softcap", "dropout_p", "seed", "offset", "deterministic", "max_seqlen_q", "max_seqlen_k", "return_softmax")
    SOFTMAX_SCALE_FIELD_NUMBER: _ClassVar[int]
    CAUSAL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LEFT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_RIGHT_FIELD_NUMBER: _ClassVar[int]
    SOFTCAP_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQLEN_Q_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQLEN_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_SOFTMAX_FIELD_NUMBER: _ClassVar[int]
    softmax_scale: float
    causal: bool
    window_left: int
    window_right: int
    softcap: float
    dropout_p: float
    seed: int
    offset: int
    deterministic: bool
    max_seqlen_q: int
    max_seqlen_k: int
    return_softmax: bool
    def __init__(self, softmax_scale: _Optional[float] = ..., causal: _Optional[bool] = ..., window_left: _Optional[int] = ..., window_right: _Optional[int] = ..., softcap: _Optional[float] = ..., dropout_p: _Optional[float] = ..., seed: _Optional[int] = ..., offset: _Optional[int] = ..., deterministic: _Optional[bool] = ..., max_seqlen_q: _Optional[int] = ..., max_seqlen_k: _Optional[int] = ..., return_softmax: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_s", "copy_in_s", "compute_s", "copy_out_s", "receive_s", "batch_requests")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    COPY_IN_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    COPY_OUT_S_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    copy_in_s: float
    compute_s: float
    copy_out_s: float
    receive_s: float
    batch_requests: int
    def __init__(self, queue_s: _Optional[float] = ..., copy_in_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., copy_out_s: _Optional[float] = ..., receive_s: _Optional[float] = ..., batch_requests: _Optional[int] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("operation", "params", "tensors", "chunk_bytes", "keep_residuals", "residual_handle", "output_region", "output_offset", "timings")
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEEP_RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_HANDLE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REGION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    params: AttentionParams
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDesc]
    chunk_bytes: int
    keep_residuals: bool
    residual_handle: str
    output_region: str
    output_offset: int
    timings: Timings
    def __init__(self, operation: _Optional[_Union[Operation, str]] = ..., params: _Optional[_Union[AttentionParams, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorDesc, _Mapping]]] = ..., chunk_bytes: _Optional[int] = ..., keep_residuals: _Optional[bool] = ..., residual_handle: _Optional[str] = ..., output_region: _Optional[str] = ..., output_offset: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: Header
    chunk: bytes
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_tokens", "max_request_bytes", "max_concurrent_requests", "max_message_bytes", "default_chunk_bytes")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    max_request_bytes: int
    max_concurrent_requests: int
    max_message_bytes: int
    default_chunk_bytes: int
    def __init__(self, max_tokens: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_concurrent_requests: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., default_chunk_bytes: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "backend", "device", "dtypes", "max_head_dim", "features", "backward", "limits", "shared_memory", "residuals", "hostname", "head_dim_classes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: str
    device: str
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    max_head_dim: int
    features: _containers.RepeatedScalarFieldContainer[str]
    backward: bool
    limits: Limits
    shared_memory: bool
    residuals: bool
    hostname: str
    head_dim_classes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., max_head_dim: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ..., backward: _Optional[bool] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., shared_memory: _Optional[bool] = ..., residuals: _Optional[bool] = ..., hostname: _Optional[str] = ..., head_dim_classes: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("residual_handles",)
    RESIDUAL_HANDLES_FIELD_NUMBER: _ClassVar[int]
    residual_handles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, residual_handles: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...
