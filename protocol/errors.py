"""Typed protocol errors.

Every refusal on the wire carries one ``ErrorCode``; inside the process it is a
``ProtocolError``. Decoders and validators raise nothing else for bad input, so a
stream handler can catch ``ProtocolError``, answer with ``error_frame(exc)`` and keep
the host alive (a libp2p handler that raises takes the whole host down).
"""

from __future__ import annotations

from enum import IntEnum

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.limits import MAX_ERROR_MESSAGE_CHARS, MAX_RETRY_AFTER_MS


class ErrorCode(IntEnum):
    """Mirror of the proto ``ErrorCode`` enum (a test keeps the two equal)."""

    ERROR_UNSPECIFIED = 0
    MALFORMED = 1
    TOO_LARGE = 2
    UNEXPECTED_MESSAGE = 3
    BAD_KEY = 4
    BAD_SIGNATURE = 5
    WRONG_PAYLOAD_TYPE = 6
    WRONG_PEER = 7
    UNKNOWN_SESSION = 8
    REPLAYED_SEQUENCE = 9
    SKIPPED_SEQUENCE = 10
    TOKEN_OUT_OF_VOCAB = 11
    BAD_TREE = 12
    TREE_TOO_LARGE = 13
    INVALID_PARAMETER = 14
    BAD_RESULT = 15
    BAD_RECEIPT = 16
    LIMIT_REACHED = 17
    OVERLOADED = 18
    UNSUPPORTED_MODEL = 19
    UNSUPPORTED_VERSION = 20
    TIMEOUT = 21
    STREAM_CLOSED = 22
    SHUTTING_DOWN = 23
    INTERNAL = 24
    BUSY = 25


class ProtocolError(Exception):
    """A refusal with one typed code; safe to send back to the peer as an Error frame.

    ``retry_after``: seconds after which asking again may succeed (BUSY, OVERLOADED), or
    None when unknown.
    """

    def __init__(self, code: ErrorCode, message: str = "",
                 retry_after: float | None = None) -> None:
        self.code = ErrorCode(code)
        self.message = message or self.code.name
        self.retry_after = retry_after
        super().__init__(f"{self.code.name}: {self.message}")

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Keep pickling (process pools, trio.to_thread results) working.
        return (type(self), (self.code, self.message, self.retry_after))


def _clip(message: str) -> str:
    # Error messages are for humans; bound them so an error frame never trips a limit.
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    return message[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."


def error_frame(exc: BaseException, session_id: bytes = b"", seq: int = 0) -> pb.Frame:
    """Turn an exception into an Error frame to send to the peer.

    A ProtocolError keeps its code and message. Anything else becomes INTERNAL with a
    generic message: details of our own bugs are logged locally, not sent to strangers.
    """
    retry_ms = 0
    if isinstance(exc, ProtocolError):
        code, message = exc.code, exc.message
        if exc.retry_after is not None:
            retry_ms = min(max(round(exc.retry_after * 1000), 1), MAX_RETRY_AFTER_MS)
    else:
        code, message = ErrorCode.INTERNAL, "internal error"
    err = pb.Error(code=int(code), message=_clip(message), session_id=session_id, seq=seq,
                   retry_after_ms=retry_ms)
    return pb.Frame(error=err)


class RemoteError(ProtocolError):
    """The peer refused with an Error frame (as opposed to our own refusal of its input)."""

    def __init__(
        self, code: ErrorCode, message: str = "", session_id: bytes = b"", seq: int = 0,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message, retry_after)
        self.session_id = session_id
        self.seq = seq

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.code, self.message, self.session_id, self.seq,
                             self.retry_after))


def from_error(err: pb.Error) -> RemoteError:
    """The RemoteError a received Error message stands for.

    Codes from a newer peer that we do not know map to ERROR_UNSPECIFIED rather than
    failing, so an error reply is always readable.
    """
    try:
        code = ErrorCode(err.code)
    except ValueError:
        code = ErrorCode.ERROR_UNSPECIFIED
    retry = min(err.retry_after_ms, MAX_RETRY_AFTER_MS) / 1000 if err.retry_after_ms else None
    return RemoteError(code, _clip(err.message), bytes(err.session_id[:64]), err.seq, retry)
