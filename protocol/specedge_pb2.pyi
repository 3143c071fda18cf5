from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_UNSPECIFIED: _ClassVar[ErrorCode]
    MALFORMED: _ClassVar[ErrorCode]
    TOO_LARGE: _ClassVar[ErrorCode]
    UNEXPECTED_MESSAGE: _ClassVar[ErrorCode]
    BAD_KEY: _ClassVar[ErrorCode]
    BAD_SIGNATURE: _ClassVar[ErrorCode]
    WRONG_PAYLOAD_TYPE: _ClassVar[ErrorCode]
    WRONG_PEER: _ClassVar[ErrorCode]
    UNKNOWN_SESSION: _ClassVar[ErrorCode]
    REPLAYED_SEQUENCE: _ClassVar[ErrorCode]
    SKIPPED_SEQUENCE: _ClassVar[ErrorCode]
    TOKEN_OUT_OF_VOCAB: _ClassVar[ErrorCode]
    BAD_TREE: _ClassVar[ErrorCode]
    TREE_TOO_LARGE: _ClassVar[ErrorCode]
    INVALID_PARAMETER: _ClassVar[ErrorCode]
    BAD_RESULT: _ClassVar[ErrorCode]
    BAD_RECEIPT: _ClassVar[ErrorCode]
    LIMIT_REACHED: _ClassVar[ErrorCode]
    OVERLOADED: _ClassVar[ErrorCode]
    UNSUPPORTED_MODEL: _ClassVar[ErrorCode]
    UNSUPPORTED_VERSION: _ClassVar[ErrorCode]
    TIMEOUT: _ClassVar[ErrorCode]
    STREAM_CLOSED: _ClassVar[ErrorCode]
    SHUTTING_DOWN: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    BUSY: _ClassVar[ErrorCode]
ERROR_UNSPECIFIED: ErrorCode
MALFORMED: ErrorCode
TOO_LARGE: ErrorCode
UNEXPECTED_MESSAGE: ErrorCode
BAD_KEY: ErrorCode
BAD_SIGNATURE: ErrorCode
WRONG_PAYLOAD_TYPE: ErrorCode
WRONG_PEER: ErrorCode
UNKNOWN_SESSION: ErrorCode
REPLAYED_SEQUENCE: ErrorCode
SKIPPED_SEQUENCE: ErrorCode
TOKEN_OUT_OF_VOCAB: ErrorCode
BAD_TREE: ErrorCode
TREE_TOO_LARGE: ErrorCode
INVALID_PARAMETER: ErrorCode
BAD_RESULT: ErrorCode
BAD_RECEIPT: ErrorCode
LIMIT_REACHED: ErrorCode
OVERLOADED: ErrorCode
UNSUPPORTED_MODEL: ErrorCode
UNSUPPORTED_VERSION: ErrorCode
TIMEOUT: ErrorCode
STREAM_CLOSED: ErrorCode
SHUTTING_DOWN: ErrorCode
INTERNAL: ErrorCode
BUSY: ErrorCode

class Envelope(_message.Message):
    __slots__ = ("public_key", "payload_type", "payload", "signature")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    payload_type: bytes
    payload: bytes
    signature: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., payload_type: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("model_id", "revision", "prompt", "sampling", "client_version", "max_new_tokens", "progress", "standing", "top_logprobs")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STANDING_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    prompt: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    client_version: str
    max_new_tokens: int
    progress: bool
    standing: bytes
    top_logprobs: int
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., prompt: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., client_version: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., progress: _Optional[bool] = ..., standing: _Optional[bytes] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "verifier_peer_id", "vocab_size", "max_tree_tokens", "pass_costs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PASS_COSTS_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    verifier_peer_id: str
    vocab_size: int
    max_tree_tokens: int
    pass_costs: _containers.RepeatedCompositeFieldContainer[PassCost]
    def __init__(self, session_id: _Optional[bytes] = ..., verifier_peer_id: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_tree_tokens: _Optional[int] = ..., pass_costs: _Optional[_Iterable[_Union[PassCost, _Mapping]]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("session_id", "seq", "tokens", "parents", "proactive", "draft_micros")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    PROACTIVE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MICROS_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    seq: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    proactive: bool
    draft_micros: int
    def __init__(self, session_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., proactive: _Optional[bool] = ..., draft_micros: _Optional[int] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("session_id", "seq", "accepted", "bonus_token", "receipt")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BONUS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    seq: int
    accepted: _containers.RepeatedScalarFieldContainer[int]
    bonus_token: int
    receipt: bytes
    def __init__(self, session_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., accepted: _Optional[_Iterable[int]] = ..., bonus_token: _Optional[int] = ..., receipt: _Optional[bytes] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("verifier_peer_id", "node_peer_id", "session_id", "seq", "request_sha256", "drafted", "accepted", "verify_micros", "unix_ms", "model_id", "draft_micros", "positions", "session_sha256", "engine", "first_position")
    VERIFIER_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MICROS_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MICROS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_SHA256_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    verifier_peer_id: str
    node_peer_id: str
    session_id: bytes
    seq: int
    request_sha256: bytes
    drafted: int
    accepted: int
    verify_micros: int
    unix_ms: int
    model_id: str
    draft_micros: int
    positions: _containers.RepeatedCompositeFieldContainer[AuditPosition]
    session_sha256: bytes
    engine: str
    first_position: int
    def __init__(self, verifier_peer_id: _Optional[str] = ..., node_peer_id: _Optional[str] = ..., session_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., request_sha256: _Optional[bytes] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., verify_micros: _Optional[int] = ..., unix_ms: _Optional[int] = ..., model_id: _Optional[str] = ..., draft_micros: _Optional[int] = ..., positions: _Optional[_Iterable[_Union[AuditPosition, _Mapping]]] = ..., session_sha256: _Optional[bytes] = ..., engine: _Optional[str] = ..., first_position: _Optional[int] = ...) -> None: ...

class AuditPosition(_message.Message):
    __slots__ = ("token", "logprob", "margin", "top_tokens", "top_logprobs", "deficit")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DEFICIT_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    margin: float
    top_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    deficit: float
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ..., margin: _Optional[float] = ..., top_tokens: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., deficit: _Optional[float] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("model_id", "node_peer_id", "prompt", "sampling", "committed", "unix_ms", "nonce")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    node_peer_id: str
    prompt: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    committed: _containers.RepeatedScalarFieldContainer[int]
    unix_ms: int
    nonce: bytes
    def __init__(self, model_id: _Optional[str] = ..., node_peer_id: _Optional[str] = ..., prompt: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., committed: _Optional[_Iterable[int]] = ..., unix_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class AuditAnswer(_message.Message):
    __slots__ = ("auditor_peer_id", "request_sha256", "model_id", "engine", "positions", "audit_micros", "unix_ms")
    AUDITOR_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    auditor_peer_id: str
    request_sha256: bytes
    model_id: str
    engine: str
    positions: _containers.RepeatedCompositeFieldContainer[AuditPosition]
    audit_micros: int
    unix_ms: int
    def __init__(self, auditor_peer_id: _Optional[str] = ..., request_sha256: _Optional[bytes] = ..., model_id: _Optional[str] = ..., engine: _Optional[str] = ..., positions: _Optional[_Iterable[_Union[AuditPosition, _Mapping]]] = ..., audit_micros: _Optional[int] = ..., unix_ms: _Optional[int] = ...) -> None: ...

class FraudProof(_message.Message):
    __slots__ = ("accused_peer_id", "requests", "receipts", "audit_request", "answers", "position")
    ACCUSED_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    accused_peer_id: str
    requests: _containers.RepeatedScalarFieldContainer[bytes]
    receipts: _containers.RepeatedScalarFieldContainer[bytes]
    audit_request: bytes
    answers: _containers.RepeatedScalarFieldContainer[bytes]
    position: int
    def __init__(self, accused_peer_id: _Optional[str] = ..., requests: _Optional[_Iterable[bytes]] = ..., receipts: _Optional[_Iterable[bytes]] = ..., audit_request: _Optional[bytes] = ..., answers: _Optional[_Iterable[bytes]] = ..., position: _Optional[int] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    reason: str
    def __init__(self, session_id: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "session_id", "seq", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    session_id: bytes
    seq: int
    retry_after_ms: int
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., session_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("session_id", "seq", "state", "queue_position", "done", "total", "eta_ms")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Progress.State]
        QUEUED: _ClassVar[Progress.State]
        PREFILLING: _ClassVar[Progress.State]
        VERIFYING: _ClassVar[Progress.State]
    STATE_UNSPECIFIED: Progress.State
    QUEUED: Progress.State
    PREFILLING: Progress.State
    VERIFYING: Progress.State
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ETA_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    seq: int
    state: Progress.State
    queue_position: int
    done: int
    total: int
    eta_ms: int
    def __init__(self, session_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., state: _Optional[_Union[Progress.State, str]] = ..., queue_position: _Optional[int] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., eta_ms: _Optional[int] = ...) -> None: ...

class PassCost(_message.Message):
    __slots__ = ("rows", "micros")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MICROS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    micros: int
    def __init__(self, rows: _Optional[int] = ..., micros: _Optional[int] = ...) -> None: ...

class Advertisement(_message.Message):
    __slots__ = ("model_id", "revision", "max_batch_tokens", "free_slots", "queue_depth", "mean_verify_micros", "protocol_version", "max_tree_tokens", "vocab_size", "prefill_tokens_per_s", "mean_pass_micros", "sessions_open", "max_sessions", "queued_prefill_tokens", "pass_costs", "engine", "committed_tokens", "your_standing", "standing_statement", "standing_issuers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MEAN_VERIFY_MICROS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_PASS_MICROS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PASS_COSTS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    YOUR_STANDING_FIELD_NUMBER: _ClassVar[int]
    STANDING_STATEMENT_FIELD_NUMBER: _ClassVar[int]
    STANDING_ISSUERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    max_batch_tokens: int
    free_slots: int
    queue_depth: int
    mean_verify_micros: int
    protocol_version: str
    max_tree_tokens: int
    vocab_size: int
    prefill_tokens_per_s: float
    mean_pass_micros: int
    sessions_open: int
    max_sessions: int
    queued_prefill_tokens: int
    pass_costs: _containers.RepeatedCompositeFieldContainer[PassCost]
    engine: str
    committed_tokens: int
    your_standing: float
    standing_statement: bytes
    standing_issuers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., max_batch_tokens: _Optional[int] = ..., free_slots: _Optional[int] = ..., queue_depth: _Optional[int] = ..., mean_verify_micros: _Optional[int] = ..., protocol_version: _Optional[str] = ..., max_tree_tokens: _Optional[int] = ..., vocab_size: _Optional[int] = ..., prefill_tokens_per_s: _Optional[float] = ..., mean_pass_micros: _Optional[int] = ..., sessions_open: _Optional[int] = ..., max_sessions: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ..., pass_costs: _Optional[_Iterable[_Union[PassCost, _Mapping]]] = ..., engine: _Optional[str] = ..., committed_tokens: _Optional[int] = ..., your_standing: _Optional[float] = ..., standing_statement: _Optional[bytes] = ..., standing_issuers: _Optional[_Iterable[str]] = ...) -> None: ...

class AdvertQuery(_message.Message):
    __slots__ = ("model_id", "want_standing")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WANT_STANDING_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    want_standing: bool
    def __init__(self, model_id: _Optional[str] = ..., want_standing: _Optional[bool] = ...) -> None: ...

class StandingStatement(_message.Message):
    __slots__ = ("issuer_peer_id", "node_peer_id", "earned", "as_of_unix_ms", "half_life_s")
    ISSUER_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    EARNED_FIELD_NUMBER: _ClassVar[int]
    AS_OF_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HALF_LIFE_S_FIELD_NUMBER: _ClassVar[int]
    issuer_peer_id: str
    node_peer_id: str
    earned: float
    as_of_unix_ms: int
    half_life_s: float
    def __init__(self, issuer_peer_id: _Optional[str] = ..., node_peer_id: _Optional[str] = ..., earned: _Optional[float] = ..., as_of_unix_ms: _Optional[int] = ..., half_life_s: _Optional[float] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("open", "opened", "verify", "result", "close", "error", "advert", "advert_query", "progress", "audit_request", "audit_answer")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ADVERT_FIELD_NUMBER: _ClassVar[int]
    ADVERT_QUERY_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    AUDIT_ANSWER_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    opened: SessionOpened
    verify: Envelope
    result: VerifyResult
    close: CloseSession
    error: Error
    advert: Advertisement
    advert_query: AdvertQuery
    progress: Progress
    audit_request: Envelope
    audit_answer: Envelope
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., verify: _Optional[_Union[Envelope, _Mapping]] = ..., result: _Optional[_Union[VerifyResult, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., advert: _Optional[_Union[Advertisement, _Mapping]] = ..., advert_query: _Optional[_Union[AdvertQuery, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., audit_request: _Optional[_Union[Envelope, _Mapping]] = ..., audit_answer: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...
