from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DrainRequest(_message.Message):
    __slots__ = ("admin_token", "worker")
    ADMIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    admin_token: str
    worker: str
    def __init__(self, admin_token: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class LiftQuarantineRequest(_message.Message):
    __slots__ = ("admin_token", "worker")
    ADMIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    admin_token: str
    worker: str
    def __init__(self, admin_token: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("admin_token", "paused")
    ADMIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    admin_token: str
    paused: bool
    def __init__(self, admin_token: _Optional[str] = ..., paused: _Optional[bool] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("admin_token",)
    ADMIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    admin_token: str
    def __init__(self, admin_token: _Optional[str] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("admin_token", "token", "end_sessions")
    ADMIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    END_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    admin_token: str
    token: str
    end_sessions: bool
    def __init__(self, admin_token: _Optional[str] = ..., token: _Optional[str] = ..., end_sessions: _Optional[bool] = ...) -> None: ...

class OperatorCertificateRequest(_message.Message):
    __slots__ = ("admin_token", "public_key_pem")
    ADMIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    admin_token: str
    public_key_pem: str
    def __init__(self, admin_token: _Optional[str] = ..., public_key_pem: _Optional[str] = ...) -> None: ...

class OperatorCertificateReply(_message.Message):
    __slots__ = ("ca_pem", "cert_pem")
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    ca_pem: str
    cert_pem: str
    def __init__(self, ca_pem: _Optional[str] = ..., cert_pem: _Optional[str] = ...) -> None: ...

class OperatorReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("after_id", "limit", "kind")
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    after_id: int
    limit: int
    kind: str
    def __init__(self, after_id: _Optional[int] = ..., limit: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class EventsReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
