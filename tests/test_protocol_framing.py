"""Length-prefixed framing: limits before bodies, short reads, timeouts, real streams."""

from __future__ import annotations

import pytest
import trio

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.framing import (
    FrameDecoder,
    decode_frames,
    encode_frame,
    parse_frame,
    read_delimited,
    read_frame,
    write_frame,
)
from specedge.protocol.limits import FRAME_LIMITS, MAX_FRAME_BYTES
from specedge.protocol.varint import decode_uvarint, encode_uvarint


class FakeStream:
    """A stream that hands out at most ``chunk`` bytes per read, then EOF or a hang."""

    def __init__(self, data: bytes, chunk: int = 1 << 30, hang_at_end: bool = False,
                 eof_exc: type[Exception] | None = None) -> None:
        self.data = data
        self.pos = 0
        self.chunk = chunk
        self.hang_at_end = hang_at_end
        self.eof_exc = eof_exc
        self.written = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.pos >= len(self.data):
            if self.hang_at_end:
                await trio.sleep_forever()
            if self.eof_exc is not None:
                raise self.eof_exc("closed")
            return b""
        take = min(n or self.chunk, self.chunk, len(self.data) - self.pos)
        out = self.data[self.pos : self.pos + take]
        self.pos += take
        return out

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written += data


def _code(exc_info: pytest.ExceptionInfo[ProtocolError]) -> ErrorCode:
    return exc_info.value.code


FRAMES = [
    pb.Frame(open=pb.OpenSession(model_id="tiny-test", prompt=list(range(300)),
                                 client_version="1.0.0", max_new_tokens=8)),
    pb.Frame(advert_query=pb.AdvertQuery()),
    pb.Frame(error=pb.Error(code=pb.TIMEOUT, message="slow")),
]


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**32, 2**63 - 1])
def test_uvarint_round_trip(value: int) -> None:
    data = encode_uvarint(value)
    assert decode_uvarint(data) == (value, len(data))
    assert decode_uvarint(data[:-1]) is None


def test_uvarint_strictness() -> None:
    with pytest.raises(ProtocolError) as e:
        decode_uvarint(b"\x80\x00")  # non-minimal zero
    assert _code(e) == ErrorCode.MALFORMED
    with pytest.raises(ProtocolError) as e:
        decode_uvarint(b"\xff" * 10)
    assert _code(e) == ErrorCode.MALFORMED
    with pytest.raises(ValueError):
        encode_uvarint(-1)
    with pytest.raises(ValueError):
        encode_uvarint(2**63)


@pytest.mark.parametrize("chunk", [1, 2, 7, 1 << 30])
def test_read_frame_handles_short_reads(chunk: int) -> None:
    stream = FakeStream(b"".join(encode_frame(f) for f in FRAMES), chunk=chunk)

    async def main() -> list[pb.Frame]:
        return [await read_frame(stream, timeout=5) for _ in FRAMES]

    assert trio.run(main) == FRAMES
    assert stream.pos == len(stream.data)  # nothing read past the last frame


def test_decoder_byte_at_a_time_and_all_at_once() -> None:
    data = b"".join(encode_frame(f) for f in FRAMES)
    decoder = FrameDecoder()
    out: list[pb.Frame] = []
    ends = set()
    for i in range(len(data)):
        got = decoder.feed(data[i : i + 1])
        out += got
        assert decoder.at_boundary == bool(got)  # a boundary only right after a frame
        if got:
            ends.add(i + 1)
    assert out == FRAMES and decoder.at_boundary
    assert sorted(ends) == [len(b"".join(encode_frame(f) for f in FRAMES[:k + 1]))
                            for k in range(len(FRAMES))]
    decoder.finish()
    assert decode_frames(data) == FRAMES


def test_length_over_limit_is_refused_before_reading_the_body() -> None:
    prefix = encode_uvarint(MAX_FRAME_BYTES + 1)
    stream = FakeStream(prefix + b"\x00" * 100)

    async def main() -> None:
        await read_frame(stream, timeout=5)

    with pytest.raises(ProtocolError) as e:
        trio.run(main)
    assert _code(e) == ErrorCode.TOO_LARGE
    assert stream.pos == len(prefix)  # not one body byte was read
    decoder = FrameDecoder(max_size=10)
    with pytest.raises(ProtocolError) as e:
        decoder.feed(encode_uvarint(11))
    assert _code(e) == ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError):
        decoder.feed(b"")  # a failed decoder stays failed


def test_read_delimited_reads_one_raw_record_under_the_same_bounds() -> None:
    """Another protocol's records (the DHT's): bytes back, nothing past the record read."""
    body = b"\x08\x04not-a-frame"
    stream = FakeStream(encode_uvarint(len(body)) + body + b"next", chunk=3)

    async def main(limit: int, timeout: float) -> bytes:
        with trio.fail_after(5):
            return await read_delimited(stream, limit, timeout)

    assert trio.run(main, 100, 5.0) == body and stream.pos == 1 + len(body)
    stream = FakeStream(encode_uvarint(101) + b"\x00" * 101)
    with pytest.raises(ProtocolError) as e:
        trio.run(main, 100, 5.0)
    assert _code(e) == ErrorCode.TOO_LARGE and stream.pos == 1
    stream = FakeStream(encode_uvarint(50) + b"\x00" * 10, hang_at_end=True)
    with pytest.raises(ProtocolError) as e:
        trio.run(main, 100, 0.05)
    assert _code(e) == ErrorCode.TIMEOUT


def test_per_kind_limits() -> None:
    big = pb.Frame(advert_query=pb.AdvertQuery(model_id="x" * 5000))
    with pytest.raises(ProtocolError) as e:
        encode_frame(big)  # the sender refuses what the receiver would refuse
    assert _code(e) == ErrorCode.TOO_LARGE
    body = big.SerializeToString()
    assert len(body) < MAX_FRAME_BYTES and len(body) > FRAME_LIMITS["advert_query"]
    with pytest.raises(ProtocolError) as e:
        parse_frame(body)
    assert _code(e) == ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x00", ErrorCode.MALFORMED),  # empty frame: no message
        (b"\x02\xff\xff", ErrorCode.MALFORMED),  # does not parse
        (b"\x03\x4a\x01\x00", ErrorCode.MALFORMED),  # unknown field only: no known message
        (b"\x05\x0a\x03\x12", ErrorCode.MALFORMED),  # ends inside the frame
        (b"\x80", ErrorCode.MALFORMED),  # ends inside the prefix
    ],
)
def test_decode_errors(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as e:
        decode_frames(data)
    assert _code(e) == code


def test_invalid_utf8_string_is_malformed() -> None:
    body = b"\x42\x04\x0a\x02\xc3\x28"  # advert_query.model_id = invalid UTF-8
    with pytest.raises(ProtocolError) as e:
        parse_frame(body)
    assert _code(e) == ErrorCode.MALFORMED


def test_empty_frame_cannot_be_encoded() -> None:
    with pytest.raises(ProtocolError) as e:
        encode_frame(pb.Frame())
    assert _code(e) == ErrorCode.MALFORMED


@pytest.mark.parametrize(
    ("data", "hang"),
    [(b"", True), (b"\x85", True), (encode_frame(FRAMES[0])[:50], True)],
)
def test_every_read_is_under_a_timeout(data: bytes, hang: bool) -> None:
    stream = FakeStream(data, hang_at_end=hang)

    async def main() -> None:
        with trio.fail_after(5):  # the test itself must not hang
            await read_frame(stream, timeout=0.05)

    with pytest.raises(ProtocolError) as e:
        trio.run(main)
    assert _code(e) == ErrorCode.TIMEOUT


@pytest.mark.parametrize("eof_exc", [None, ConnectionResetError, RuntimeError])
@pytest.mark.parametrize("data", [b"", b"\x85", encode_frame(FRAMES[0])[:50]])
def test_end_of_stream_is_stream_closed(data: bytes, eof_exc: type[Exception] | None) -> None:
    stream = FakeStream(data, eof_exc=eof_exc)

    async def main() -> None:
        await read_frame(stream, timeout=5)

    with pytest.raises(ProtocolError) as e:
        trio.run(main)
    assert _code(e) == ErrorCode.STREAM_CLOSED
    assert ("inside" in e.value.message) == bool(data)


def test_write_frame_errors() -> None:
    class Broken:
        async def write(self, data: bytes) -> None:
            raise OSError("reset")

    class Stuck:
        async def write(self, data: bytes) -> None:
            await trio.sleep_forever()

    async def write(stream, timeout: float = 5) -> None:
        await write_frame(stream, FRAMES[1], timeout=timeout)

    with pytest.raises(ProtocolError) as e:
        trio.run(write, Broken())
    assert _code(e) == ErrorCode.STREAM_CLOSED
    with pytest.raises(ProtocolError) as e:
        trio.run(write, Stuck(), 0.05)
    assert _code(e) == ErrorCode.TIMEOUT
    ok = FakeStream(b"")
    trio.run(write, ok)
    assert bytes(ok.written) == encode_frame(FRAMES[1])


def test_frames_over_a_real_libp2p_stream() -> None:
    """Two hosts on loopback: frames cross intact; an unknown major version is refused."""
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.network.config import ConnectionConfig
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    from specedge.protocol.errors import error_frame
    from specedge.protocol.ids import VERIFY_PROTOCOL

    received: list[pb.Frame] = []
    server_errors: list[ErrorCode] = []

    async def echo(stream) -> None:
        # A handler must contain its own errors (one that raises kills the host).
        try:
            while True:
                frame = await read_frame(stream, timeout=5)
                received.append(frame)
                await write_frame(stream, frame)
        except ProtocolError as exc:
            server_errors.append(exc.code)
            if exc.code not in (ErrorCode.STREAM_CLOSED, ErrorCode.TIMEOUT):
                try:
                    await write_frame(stream, error_frame(exc), timeout=1)
                except ProtocolError:
                    pass

    async def main() -> None:
        cfg = ConnectionConfig(max_connections_per_peer=1)
        a = new_host(key_pair=create_new_key_pair(), connection_config=cfg)
        b = new_host(key_pair=create_new_key_pair(), connection_config=cfg)
        addr = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
        with trio.fail_after(20):
            async with a.run(addr), b.run(addr):
                a.set_stream_handler(VERIFY_PROTOCOL, echo)
                await b.connect(info_from_p2p_addr(a.get_addrs()[0]))
                stream = await b.new_stream(a.get_id(), [VERIFY_PROTOCOL])
                big = pb.Frame(open=pb.OpenSession(model_id="m", prompt=[2**32 - 1] * 30_000))
                for frame in [*FRAMES, big]:
                    await write_frame(stream, frame, timeout=5)
                    assert await read_frame(stream, timeout=5) == frame
                # Garbage gets a typed error back and the host survives.
                await stream.write(b"\x02\xff\xff")
                reply = await read_frame(stream, timeout=5)
                assert reply.error.code == pb.MALFORMED
                await stream.close()
                with pytest.raises(Exception, match="failed to open a stream"):
                    await b.new_stream(a.get_id(), ["/specedge/verify/2.0.0"])
                await trio.sleep(0.05)

    trio.run(main)
    assert received == [*FRAMES, received[-1]] and len(received) == len(FRAMES) + 1
    assert server_errors == [ErrorCode.MALFORMED]
