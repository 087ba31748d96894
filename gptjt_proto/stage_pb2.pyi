from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvidenceRequest(_message.Message):
    __slots__ = ("ticket_id", "attempt")
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ticket_id: int
    attempt: int
    def __init__(self, ticket_id: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class EvidenceReply(_message.Message):
    __slots__ = ("wire", "input_shape", "returned", "returned_data", "step")
    WIRE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    RETURNED_FIELD_NUMBER: _ClassVar[int]
    RETURNED_DATA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    wire: _containers.RepeatedScalarFieldContainer[bytes]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    returned: TensorMeta
    returned_data: bytes
    step: int
    def __init__(self, wire: _Optional[_Iterable[bytes]] = ..., input_shape: _Optional[_Iterable[int]] = ..., returned: _Optional[_Union[TensorMeta, _Mapping]] = ..., returned_data: _Optional[bytes] = ..., step: _Optional[int] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("received_bytes",)
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    def __init__(self, received_bytes: _Optional[int] = ...) -> None: ...

class TensorMeta(_message.Message):
    __slots__ = ("shape", "dtype", "codec", "nbytes")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    codec: str
    nbytes: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., codec: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class MicroBatchHeader(_message.Message):
    __slots__ = ("ticket_id", "step", "attempt", "global_batch", "prefix_lengths", "labels", "activations", "stage", "gradient_codec")
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CODEC_FIELD_NUMBER: _ClassVar[int]
    ticket_id: int
    step: int
    attempt: int
    global_batch: int
    prefix_lengths: _containers.RepeatedScalarFieldContainer[int]
    labels: bytes
    activations: TensorMeta
    stage: int
    gradient_codec: str
    def __init__(self, ticket_id: _Optional[int] = ..., step: _Optional[int] = ..., attempt: _Optional[int] = ..., global_batch: _Optional[int] = ..., prefix_lengths: _Optional[_Iterable[int]] = ..., labels: _Optional[bytes] = ..., activations: _Optional[_Union[TensorMeta, _Mapping]] = ..., stage: _Optional[int] = ..., gradient_codec: _Optional[str] = ...) -> None: ...

class ReplyHeader(_message.Message):
    __slots__ = ("loss", "target_tokens", "gradient", "compute_s")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    loss: float
    target_tokens: int
    gradient: TensorMeta
    compute_s: float
    def __init__(self, loss: _Optional[float] = ..., target_tokens: _Optional[int] = ..., gradient: _Optional[_Union[TensorMeta, _Mapping]] = ..., compute_s: _Optional[float] = ...) -> None: ...

class StageChunk(_message.Message):
    __slots__ = ("header", "reply", "data", "state")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    header: MicroBatchHeader
    reply: ReplyHeader
    data: bytes
    state: StateHeader
    def __init__(self, header: _Optional[_Union[MicroBatchHeader, _Mapping]] = ..., reply: _Optional[_Union[ReplyHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., state: _Optional[_Union[StateHeader, _Mapping]] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("nbytes", "position", "stage", "start_layer", "end_layer")
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    nbytes: int
    position: int
    stage: int
    start_layer: int
    end_layer: int
    def __init__(self, nbytes: _Optional[int] = ..., position: _Optional[int] = ..., stage: _Optional[int] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ...) -> None: ...

class FetchStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
