from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    LOADING: _ClassVar[WorkerState]
    READY: _ClassVar[WorkerState]
    DRAINING: _ClassVar[WorkerState]
    STANDBY: _ClassVar[WorkerState]

class StepPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[StepPhase]
    WAITING: _ClassVar[StepPhase]
    OPEN: _ClassVar[StepPhase]
    ACCUMULATED: _ClassVar[StepPhase]
    APPLYING: _ClassVar[StepPhase]
    DONE: _ClassVar[StepPhase]
    AVERAGING: _ClassVar[StepPhase]

class CommitResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMIT_RESULT_UNSPECIFIED: _ClassVar[CommitResult]
    COMMITTED: _ClassVar[CommitResult]
    ALREADY_COMMITTED: _ClassVar[CommitResult]
    STALE: _ClassVar[CommitResult]
    NOT_LEASED: _ClassVar[CommitResult]

class ReportKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPORT_KIND_UNSPECIFIED: _ClassVar[ReportKind]
    CONTRIBUTION: _ClassVar[ReportKind]
    AVERAGED: _ClassVar[ReportKind]
    APPLIED: _ClassVar[ReportKind]
    AVERAGING_FAILED: _ClassVar[ReportKind]
WORKER_STATE_UNSPECIFIED: WorkerState
LOADING: WorkerState
READY: WorkerState
DRAINING: WorkerState
STANDBY: WorkerState
PHASE_UNSPECIFIED: StepPhase
WAITING: StepPhase
OPEN: StepPhase
ACCUMULATED: StepPhase
APPLYING: StepPhase
DONE: StepPhase
AVERAGING: StepPhase
COMMIT_RESULT_UNSPECIFIED: CommitResult
COMMITTED: CommitResult
ALREADY_COMMITTED: CommitResult
STALE: CommitResult
NOT_LEASED: CommitResult
REPORT_KIND_UNSPECIFIED: ReportKind
CONTRIBUTION: ReportKind
AVERAGED: ReportKind
APPLIED: ReportKind
AVERAGING_FAILED: ReportKind

class DeviceInfo(_message.Message):
    __slots__ = ("kind", "name", "memory_bytes", "matmul_tflops", "dtype", "block_tflops", "head_tflops")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MATMUL_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    HEAD_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    memory_bytes: int
    matmul_tflops: float
    dtype: str
    block_tflops: float
    head_tflops: float
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., matmul_tflops: _Optional[float] = ..., dtype: _Optional[str] = ..., block_tflops: _Optional[float] = ..., head_tflops: _Optional[float] = ...) -> None: ...

class LinkMeasurement(_message.Message):
    __slots__ = ("address", "latency_ms", "mbit", "measured_unix_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MBIT_FIELD_NUMBER: _ClassVar[int]
    MEASURED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    latency_ms: float
    mbit: float
    measured_unix_s: float
    def __init__(self, address: _Optional[str] = ..., latency_ms: _Optional[float] = ..., mbit: _Optional[float] = ..., measured_unix_s: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("token", "name", "address", "device", "worker_id", "public_key_pem", "dht_public_key")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    DHT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    token: str
    name: str
    address: str
    device: DeviceInfo
    worker_id: str
    public_key_pem: str
    dht_public_key: bytes
    def __init__(self, token: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., device: _Optional[_Union[DeviceInfo, _Mapping]] = ..., worker_id: _Optional[str] = ..., public_key_pem: _Optional[str] = ..., dht_public_key: _Optional[bytes] = ...) -> None: ...

class DhtAccessToken(_message.Message):
    __slots__ = ("username", "public_key", "expiration_time", "signature")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_TIME_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    username: str
    public_key: bytes
    expiration_time: str
    signature: bytes
    def __init__(self, username: _Optional[str] = ..., public_key: _Optional[bytes] = ..., expiration_time: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StageAssignment(_message.Message):
    __slots__ = ("stage", "start_layer", "end_layer", "embed", "head", "next_address", "num_stages", "next_addresses", "member", "peer_ids", "peer_addresses", "contributors", "checkpoint_writer", "standby_reason", "next_ids", "peer_address_ids", "upstream_ids", "fetcher_ids", "peer_dht_ids", "verifier_ids", "attested_digests", "attested_position")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    PEER_IDS_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_WRITER_FIELD_NUMBER: _ClassVar[int]
    STANDBY_REASON_FIELD_NUMBER: _ClassVar[int]
    NEXT_IDS_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_IDS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_IDS_FIELD_NUMBER: _ClassVar[int]
    FETCHER_IDS_FIELD_NUMBER: _ClassVar[int]
    PEER_DHT_IDS_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTESTED_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    ATTESTED_POSITION_FIELD_NUMBER: _ClassVar[int]
    stage: int
    start_layer: int
    end_layer: int
    embed: bool
    head: bool
    next_address: str
    num_stages: int
    next_addresses: _containers.RepeatedScalarFieldContainer[str]
    member: bool
    peer_ids: _containers.RepeatedScalarFieldContainer[str]
    peer_addresses: _containers.RepeatedScalarFieldContainer[str]
    contributors: _containers.RepeatedScalarFieldContainer[str]
    checkpoint_writer: bool
    standby_reason: str
    next_ids: _containers.RepeatedScalarFieldContainer[str]
    peer_address_ids: _containers.RepeatedScalarFieldContainer[str]
    upstream_ids: _containers.RepeatedScalarFieldContainer[str]
    fetcher_ids: _containers.RepeatedScalarFieldContainer[str]
    peer_dht_ids: _containers.RepeatedScalarFieldContainer[str]
    verifier_ids: _containers.RepeatedScalarFieldContainer[str]
    attested_digests: _containers.RepeatedScalarFieldContainer[str]
    attested_position: int
    def __init__(self, stage: _Optional[int] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., embed: _Optional[bool] = ..., head: _Optional[bool] = ..., next_address: _Optional[str] = ..., num_stages: _Optional[int] = ..., next_addresses: _Optional[_Iterable[str]] = ..., member: _Optional[bool] = ..., peer_ids: _Optional[_Iterable[str]] = ..., peer_addresses: _Optional[_Iterable[str]] = ..., contributors: _Optional[_Iterable[str]] = ..., checkpoint_writer: _Optional[bool] = ..., standby_reason: _Optional[str] = ..., next_ids: _Optional[_Iterable[str]] = ..., peer_address_ids: _Optional[_Iterable[str]] = ..., upstream_ids: _Optional[_Iterable[str]] = ..., fetcher_ids: _Optional[_Iterable[str]] = ..., peer_dht_ids: _Optional[_Iterable[str]] = ..., verifier_ids: _Optional[_Iterable[str]] = ..., attested_digests: _Optional[_Iterable[str]] = ..., attested_position: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("worker_id", "run_config_json", "assignment", "heartbeat_interval_s", "dht_peers", "session", "ca_pem", "cert_pem", "dht_token", "dht_authority_key")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    DHT_PEERS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    DHT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DHT_AUTHORITY_KEY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    run_config_json: str
    assignment: StageAssignment
    heartbeat_interval_s: float
    dht_peers: _containers.RepeatedScalarFieldContainer[str]
    session: str
    ca_pem: str
    cert_pem: str
    dht_token: DhtAccessToken
    dht_authority_key: bytes
    def __init__(self, worker_id: _Optional[str] = ..., run_config_json: _Optional[str] = ..., assignment: _Optional[_Union[StageAssignment, _Mapping]] = ..., heartbeat_interval_s: _Optional[float] = ..., dht_peers: _Optional[_Iterable[str]] = ..., session: _Optional[str] = ..., ca_pem: _Optional[str] = ..., cert_pem: _Optional[str] = ..., dht_token: _Optional[_Union[DhtAccessToken, _Mapping]] = ..., dht_authority_key: _Optional[bytes] = ...) -> None: ...

class WorkerMetrics(_message.Message):
    __slots__ = ("micro_batches_per_s", "busy_fraction", "bytes_sent", "bytes_received", "micro_batches", "downstream_mbit", "activation_codec", "gradient_codec", "averaging_bytes", "peak_memory_bytes")
    MICRO_BATCHES_PER_S_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_MBIT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CODEC_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CODEC_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    micro_batches_per_s: float
    busy_fraction: float
    bytes_sent: int
    bytes_received: int
    micro_batches: int
    downstream_mbit: float
    activation_codec: str
    gradient_codec: str
    averaging_bytes: int
    peak_memory_bytes: int
    def __init__(self, micro_batches_per_s: _Optional[float] = ..., busy_fraction: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., micro_batches: _Optional[int] = ..., downstream_mbit: _Optional[float] = ..., activation_codec: _Optional[str] = ..., gradient_codec: _Optional[str] = ..., averaging_bytes: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "metrics", "state", "loaded_epoch", "position", "device", "links", "coordinator_rtt_ms", "dht_maddrs")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOADED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_RTT_MS_FIELD_NUMBER: _ClassVar[int]
    DHT_MADDRS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    metrics: WorkerMetrics
    state: int
    loaded_epoch: int
    position: int
    device: DeviceInfo
    links: _containers.RepeatedCompositeFieldContainer[LinkMeasurement]
    coordinator_rtt_ms: float
    dht_maddrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., metrics: _Optional[_Union[WorkerMetrics, _Mapping]] = ..., state: _Optional[int] = ..., loaded_epoch: _Optional[int] = ..., position: _Optional[int] = ..., device: _Optional[_Union[DeviceInfo, _Mapping]] = ..., links: _Optional[_Iterable[_Union[LinkMeasurement, _Mapping]]] = ..., coordinator_rtt_ms: _Optional[float] = ..., dht_maddrs: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known", "checks")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    checks: _containers.RepeatedCompositeFieldContainer[SpotCheck]
    def __init__(self, known: _Optional[bool] = ..., checks: _Optional[_Iterable[_Union[SpotCheck, _Mapping]]] = ...) -> None: ...

class SpotCheck(_message.Message):
    __slots__ = ("check_id", "step", "attempt", "ticket_id", "stage", "worker_id", "address", "commitment", "returned", "weights", "start_layer", "end_layer", "embed", "head", "loss_scale")
    CHECK_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    RETURNED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    check_id: int
    step: int
    attempt: int
    ticket_id: int
    stage: int
    worker_id: str
    address: str
    commitment: bytes
    returned: bytes
    weights: str
    start_layer: int
    end_layer: int
    embed: bool
    head: bool
    loss_scale: float
    def __init__(self, check_id: _Optional[int] = ..., step: _Optional[int] = ..., attempt: _Optional[int] = ..., ticket_id: _Optional[int] = ..., stage: _Optional[int] = ..., worker_id: _Optional[str] = ..., address: _Optional[str] = ..., commitment: _Optional[bytes] = ..., returned: _Optional[bytes] = ..., weights: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., embed: _Optional[bool] = ..., head: _Optional[bool] = ..., loss_scale: _Optional[float] = ...) -> None: ...

class CheckReport(_message.Message):
    __slots__ = ("worker_id", "check_id", "commitment", "unable")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CHECK_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    UNABLE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    check_id: int
    commitment: bytes
    unable: str
    def __init__(self, worker_id: _Optional[str] = ..., check_id: _Optional[int] = ..., commitment: _Optional[bytes] = ..., unable: _Optional[str] = ...) -> None: ...

class CheckReportReply(_message.Message):
    __slots__ = ("verdict",)
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    verdict: str
    def __init__(self, verdict: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class RunState(_message.Message):
    __slots__ = ("step", "attempt", "phase", "global_grad_norm", "plan_version", "assignment", "paused", "restore_epoch", "restore_step", "restore_from_store", "measure_links", "dht_peers", "measure_link_ids", "drain", "loss_scale", "newest_check")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    RESTORE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESTORE_STEP_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FROM_STORE_FIELD_NUMBER: _ClassVar[int]
    MEASURE_LINKS_FIELD_NUMBER: _ClassVar[int]
    DHT_PEERS_FIELD_NUMBER: _ClassVar[int]
    MEASURE_LINK_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    NEWEST_CHECK_FIELD_NUMBER: _ClassVar[int]
    step: int
    attempt: int
    phase: StepPhase
    global_grad_norm: float
    plan_version: int
    assignment: StageAssignment
    paused: bool
    restore_epoch: int
    restore_step: int
    restore_from_store: bool
    measure_links: _containers.RepeatedScalarFieldContainer[str]
    dht_peers: _containers.RepeatedScalarFieldContainer[str]
    measure_link_ids: _containers.RepeatedScalarFieldContainer[str]
    drain: bool
    loss_scale: float
    newest_check: int
    def __init__(self, step: _Optional[int] = ..., attempt: _Optional[int] = ..., phase: _Optional[_Union[StepPhase, str]] = ..., global_grad_norm: _Optional[float] = ..., plan_version: _Optional[int] = ..., assignment: _Optional[_Union[StageAssignment, _Mapping]] = ..., paused: _Optional[bool] = ..., restore_epoch: _Optional[int] = ..., restore_step: _Optional[int] = ..., restore_from_store: _Optional[bool] = ..., measure_links: _Optional[_Iterable[str]] = ..., dht_peers: _Optional[_Iterable[str]] = ..., measure_link_ids: _Optional[_Iterable[str]] = ..., drain: _Optional[bool] = ..., loss_scale: _Optional[float] = ..., newest_check: _Optional[int] = ...) -> None: ...

class CheckpointHeader(_message.Message):
    __slots__ = ("worker_id", "step", "start_layer", "end_layer", "embed", "head", "nbytes", "sha256", "stored_at")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STORED_AT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    step: int
    start_layer: int
    end_layer: int
    embed: bool
    head: bool
    nbytes: int
    sha256: str
    stored_at: str
    def __init__(self, worker_id: _Optional[str] = ..., step: _Optional[int] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., embed: _Optional[bool] = ..., head: _Optional[bool] = ..., nbytes: _Optional[int] = ..., sha256: _Optional[str] = ..., stored_at: _Optional[str] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CheckpointHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[CheckpointHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class GetCheckpointRequest(_message.Message):
    __slots__ = ("step", "start_layer", "end_layer", "embed", "head")
    STEP_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    step: int
    start_layer: int
    end_layer: int
    embed: bool
    head: bool
    def __init__(self, step: _Optional[int] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., embed: _Optional[bool] = ..., head: _Optional[bool] = ...) -> None: ...

class Ticket(_message.Message):
    __slots__ = ("ticket_id", "step", "attempt", "index", "shard", "offset")
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ticket_id: int
    step: int
    attempt: int
    index: int
    shard: int
    offset: int
    def __init__(self, ticket_id: _Optional[int] = ..., step: _Optional[int] = ..., attempt: _Optional[int] = ..., index: _Optional[int] = ..., shard: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("worker_id", "max_tickets")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TICKETS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    max_tickets: int
    def __init__(self, worker_id: _Optional[str] = ..., max_tickets: _Optional[int] = ...) -> None: ...

class LeaseReply(_message.Message):
    __slots__ = ("tickets", "reason")
    TICKETS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    tickets: _containers.RepeatedCompositeFieldContainer[Ticket]
    reason: str
    def __init__(self, tickets: _Optional[_Iterable[_Union[Ticket, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("worker_id", "ticket_id", "attempt", "loss", "tokens")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    ticket_id: int
    attempt: int
    loss: float
    tokens: int
    def __init__(self, worker_id: _Optional[str] = ..., ticket_id: _Optional[int] = ..., attempt: _Optional[int] = ..., loss: _Optional[float] = ..., tokens: _Optional[int] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: CommitResult
    def __init__(self, result: _Optional[_Union[CommitResult, str]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("worker_id", "ticket_ids", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    ticket_ids: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., ticket_ids: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("worker_id", "step", "attempt", "kind", "grad_norm_sq", "micro_batches", "group_weight", "state_digest", "detail", "commitments")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_SQ_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    GROUP_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    step: int
    attempt: int
    kind: ReportKind
    grad_norm_sq: float
    micro_batches: int
    group_weight: float
    state_digest: str
    detail: str
    commitments: _containers.RepeatedCompositeFieldContainer[MicroBatchCommitment]
    def __init__(self, worker_id: _Optional[str] = ..., step: _Optional[int] = ..., attempt: _Optional[int] = ..., kind: _Optional[_Union[ReportKind, str]] = ..., grad_norm_sq: _Optional[float] = ..., micro_batches: _Optional[int] = ..., group_weight: _Optional[float] = ..., state_digest: _Optional[str] = ..., detail: _Optional[str] = ..., commitments: _Optional[_Iterable[_Union[MicroBatchCommitment, _Mapping]]] = ...) -> None: ...

class MicroBatchCommitment(_message.Message):
    __slots__ = ("ticket_id", "attempt", "commitment", "sent", "returned", "sent_back")
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    RETURNED_FIELD_NUMBER: _ClassVar[int]
    SENT_BACK_FIELD_NUMBER: _ClassVar[int]
    ticket_id: int
    attempt: int
    commitment: bytes
    sent: bytes
    returned: bytes
    sent_back: bytes
    def __init__(self, ticket_id: _Optional[int] = ..., attempt: _Optional[int] = ..., commitment: _Optional[bytes] = ..., sent: _Optional[bytes] = ..., returned: _Optional[bytes] = ..., sent_back: _Optional[bytes] = ...) -> None: ...

class StepReportReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class PeerFailure(_message.Message):
    __slots__ = ("worker_id", "address", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PeerFailureReply(_message.Message):
    __slots__ = ("declared_dead",)
    DECLARED_DEAD_FIELD_NUMBER: _ClassVar[int]
    declared_dead: bool
    def __init__(self, declared_dead: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("accept_gzip",)
    ACCEPT_GZIP_FIELD_NUMBER: _ClassVar[int]
    accept_gzip: bool
    def __init__(self, accept_gzip: _Optional[bool] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json", "json_gzip")
    JSON_FIELD_NUMBER: _ClassVar[int]
    JSON_GZIP_FIELD_NUMBER: _ClassVar[int]
    json: str
    json_gzip: bytes
    def __init__(self, json: _Optional[str] = ..., json_gzip: _Optional[bytes] = ...) -> None: ...
