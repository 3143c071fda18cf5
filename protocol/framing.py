"""Length-delimited Frames on libp2p streams.

Each record is ``uvarint(len(body)) || body`` where body is a serialized Frame
(libp2p's own convention, so any language can speak it). The receiver refuses a
length above its limit before reading the body, bounds every read with a timeout
(a frozen peer otherwise hangs a read forever), and turns every failure into a
ProtocolError so stream handlers never leak exceptions into the host.

``encode_frame``, ``parse_frame`` and ``FrameDecoder`` are pure: they serve tests,
fuzzing and any non-libp2p transport.
"""

from __future__ import annotations

from typing import Protocol

import trio
from google.protobuf.message import DecodeError

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.limits import FRAME_LIMITS, MAX_FRAME_BYTES, SILENCE_TIMEOUT, WRITE_TIMEOUT
from specedge.protocol.varint import decode_uvarint, encode_uvarint


class ReadStream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...


class WriteStream(Protocol):
    async def write(self, data: bytes) -> None: ...


def frame_kind(frame: pb.Frame) -> str | None:
    """Name of the oneof member set ("open", "verify", ...), or None."""
    return frame.WhichOneof("body")


def parse_frame(body: bytes) -> pb.Frame:
    """Parse one frame body (no length prefix).

    MALFORMED if it does not parse or carries no message; TOO_LARGE if it exceeds its
    kind's limit (the outer limit only bounds the largest kind).
    """
    try:
        frame = pb.Frame.FromString(bytes(body))
    except (DecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, "frame does not parse") from exc
    kind = frame_kind(frame)
    if kind is None:
        raise ProtocolError(ErrorCode.MALFORMED, "frame carries no known message")
    limit = FRAME_LIMITS[kind]
    if len(body) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{kind} frame of {len(body)} bytes > {limit}")
    return frame


def encode_frame(frame: pb.Frame) -> bytes:
    """Serialize with its length prefix.

    Refuses (TOO_LARGE / MALFORMED) what the peer would refuse, so a bug shows up at
    the sender rather than as a dropped stream.
    """
    kind = frame_kind(frame)
    if kind is None:
        raise ProtocolError(ErrorCode.MALFORMED, "frame carries no message")
    body = frame.SerializeToString()
    if len(body) > FRAME_LIMITS[kind]:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"{kind} frame of {len(body)} bytes > {FRAME_LIMITS[kind]}"
        )
    return encode_uvarint(len(body)) + body


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get whole Frames out.

    Holds at most one partial frame. After an error it stays failed: the stream is
    out of sync and must be closed.
    """

    def __init__(self, max_size: int = MAX_FRAME_BYTES) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._need: int | None = None  # body length once the prefix is read
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[pb.Frame]:
        """Add bytes; return every frame they complete (possibly none)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: list[pb.Frame] = []
        try:
            while True:
                if self._need is None:
                    head = decode_uvarint(self._buf)
                    if head is None:
                        break
                    length, used = head
                    if length > self.max_size:
                        raise ProtocolError(
                            ErrorCode.TOO_LARGE, f"frame of {length} bytes > {self.max_size}"
                        )
                    del self._buf[:used]
                    self._need = length
                if len(self._buf) < self._need:
                    break
                body = bytes(self._buf[: self._need])
                del self._buf[: self._need]
                self._need = None
                frames.append(parse_frame(body))
        except ProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise
        return frames

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is held (a clean place for the stream to end)."""
        return not self._buf and self._need is None

    def finish(self) -> None:
        """Call at end of stream: MALFORMED if it ended inside a frame."""
        if self._error is not None:
            raise self._error
        if not self.at_boundary:
            raise ProtocolError(ErrorCode.MALFORMED, "stream ended inside a frame")


def decode_frames(data: bytes, max_size: int = MAX_FRAME_BYTES) -> list[pb.Frame]:
    """Decode a complete byte string of frames (MALFORMED if it ends mid-frame)."""
    decoder = FrameDecoder(max_size)
    frames = decoder.feed(data)
    decoder.finish()
    return frames


async def _read_some(stream: ReadStream, n: int, started: bool) -> bytes:
    # One read, with transport failures mapped to protocol errors.
    try:
        chunk = await stream.read(n)
    except ProtocolError:
        raise
    except Exception as exc:  # StreamEOF, StreamReset, StreamError, trio errors, OSError
        where = "inside a frame" if started else "between frames"
        raise ProtocolError(
            ErrorCode.STREAM_CLOSED, f"stream closed {where} ({type(exc).__name__})"
        ) from exc
    if not chunk:
        # A peer that dies mid-frame is gone, not malicious: same code either way.
        where = "inside a frame" if started else "between frames"
        raise ProtocolError(ErrorCode.STREAM_CLOSED, f"stream closed {where}")
    if len(chunk) > n:  # a misbehaving stream; never trust it to respect n
        raise ProtocolError(ErrorCode.INTERNAL, "stream returned more bytes than asked")
    return chunk


async def _read_frame(stream: ReadStream, max_size: int) -> pb.Frame:
    return parse_frame(await _read_delimited(stream, max_size))


async def _read_delimited(stream: ReadStream, max_size: int) -> bytes:
    # The prefix is read a byte at a time so nothing past this record is consumed.
    prefix = bytearray()
    while True:
        prefix += await _read_some(stream, 1, started=bool(prefix))
        head = decode_uvarint(prefix)
        if head is not None:
            length = head[0]
            break
    if length > max_size:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame of {length} bytes > {max_size}")
    body = bytearray()
    while len(body) < length:
        body += await _read_some(stream, length - len(body), started=True)
    return bytes(body)


async def read_frame(
    stream: ReadStream, max_size: int = MAX_FRAME_BYTES, timeout: float = SILENCE_TIMEOUT
) -> pb.Frame:
    """Read one Frame from a libp2p stream.

    Raises ProtocolError only: TIMEOUT if the whole frame does not arrive within
    ``timeout`` seconds, STREAM_CLOSED when the stream ends or breaks (the message
    says whether inside a frame), MALFORMED for an unparsable frame, TOO_LARGE for a
    length over ``max_size`` (checked before the body is read).
    """
    with trio.move_on_after(timeout):
        return await _read_frame(stream, max_size)
    # Only reached when the deadline cancelled the read.
    raise ProtocolError(ErrorCode.TIMEOUT, f"no complete frame within {timeout:g} s")


async def read_delimited(stream: ReadStream, max_size: int, timeout: float) -> bytes:
    """Read one uvarint-length-prefixed record of another protocol (e.g. libp2p's DHT),
    with the same bounds and errors as ``read_frame`` but no parsing."""
    with trio.move_on_after(timeout):
        return await _read_delimited(stream, max_size)
    raise ProtocolError(ErrorCode.TIMEOUT, f"no complete record within {timeout:g} s")


async def write_frame(stream: WriteStream, frame: pb.Frame, timeout: float = WRITE_TIMEOUT) -> None:
    """Write one Frame (TIMEOUT, STREAM_CLOSED or the encoder's errors on failure)."""
    data = encode_frame(frame)
    with trio.move_on_after(timeout):
        try:
            await stream.write(data)
        except Exception as exc:  # StreamClosed, StreamError, StreamReset, OSError
            raise ProtocolError(
                ErrorCode.STREAM_CLOSED, f"cannot write ({type(exc).__name__})"
            ) from exc
        return
    raise ProtocolError(ErrorCode.TIMEOUT, f"write did not finish within {timeout:g} s")
