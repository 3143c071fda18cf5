"""A raw libp2p test peer that misbehaves on purpose (importable as `hostile_peer`).

It runs inside the test process on trio: one libp2p host per identity, raw streams to a
verifier, and exact bytes written to them (not only well-formed frames). Every read has
a deadline, so each probe ends in one of three outcomes, all of them acceptable answers
from a verifier that defends itself:

- ``"error:CODE"``: the verifier answered an Error frame (CODE is its ErrorCode name);
- ``"closed"``: the verifier closed or reset the stream;
- ``"timeout"``: nothing within the probe's deadline (a failure for every probe here).

Nothing in this module imports model code.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair

from specedge.protocol import hosts
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import request_frame, seal_request
from specedge.protocol.errors import ErrorCode, ProtocolError, from_error
from specedge.protocol.framing import encode_frame, read_frame, write_frame
from specedge.protocol.identity import peer_id_of
from specedge.protocol.ids import PROTOCOL_VERSION, VERIFY_PROTOCOL

STREAM_TIMEOUT = 10.0


@dataclass
class Outcome:
    """How a probe ended and how long it took."""

    kind: str  # "error:CODE" | "closed" | "timeout" | "frame:KIND"
    seconds: float
    error: pb.Error | None = None

    @property
    def code(self) -> str | None:
        return self.kind.split(":", 1)[1] if self.kind.startswith("error:") else None


class Peer:
    """One identity with a running host, connected to one verifier."""

    def __init__(self, host: object, key_pair: KeyPair, verifier_addr: str) -> None:
        self.host = host
        self.key_pair = key_pair
        self.peer_id = peer_id_of(key_pair)
        self.info = hosts.parse_peer_addr(verifier_addr)
        self.verifier = self.info.peer_id.to_base58()

    async def stream(self, protocol: str = VERIFY_PROTOCOL) -> object:
        with trio.fail_after(STREAM_TIMEOUT):
            return await self.host.new_stream(self.info.peer_id, [protocol])

    async def try_session(self, prompt: Sequence[int], max_new_tokens: int = 64
                          ) -> Session | Outcome:
        """A session, or how the verifier refused to open one."""
        s = await self.stream()
        out = await probe(s, encode_frame(pb.Frame(open=open_msg(prompt, max_new_tokens))),
                          timeout=60, close_after=False)
        if out.kind == "frame:opened":
            return Session(s, self, out.opened)  # type: ignore[attr-defined]
        await hang_up(s)
        return out

    async def session(self, prompt: Sequence[int], max_new_tokens: int = 64,
                      model_id: str = "tiny-test") -> Session:
        """A well-formed session (the base most attacks start from)."""
        s = await self.stream()
        await write_frame(s, pb.Frame(open=open_msg(prompt, max_new_tokens, model_id)))
        frame = await read_frame(s, timeout=60)
        if frame.WhichOneof("body") != "opened":
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"open refused: {frame}")
        return Session(s, self, frame.opened)


@dataclass
class Session:
    stream: object
    peer: Peer
    opened: pb.SessionOpened
    seq: int = 0

    @property
    def id(self) -> bytes:
        return bytes(self.opened.session_id)

    def envelope(self, tokens: Sequence[int], parents: Sequence[int], *, seq: int | None = None,
                 session_id: bytes | None = None, key_pair: KeyPair | None = None) -> bytes:
        req = pb.VerifyRequest(session_id=self.id if session_id is None else session_id,
                               seq=self.seq + 1 if seq is None else seq, tokens=list(tokens),
                               parents=list(parents))
        return seal_request(key_pair or self.peer.key_pair, req)

    async def send_envelope(self, envelope: bytes, timeout: float = 30.0) -> Outcome:
        """Send a verify frame holding these envelope bytes; the verifier's answer."""
        return await probe(self.stream, encode_frame(request_frame(envelope)), timeout,
                           close_after=False)

    async def good_round(self, tokens: Sequence[int] = (1,), parents: Sequence[int] = (-1,)
                         ) -> pb.VerifyResult:
        out = await self.send_envelope(self.envelope(tokens, parents))
        if out.kind != "frame:result":
            raise AssertionError(f"a correct request was not answered: {out}")
        self.seq += 1
        return out.result  # type: ignore[attr-defined]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await write_frame(self.stream, pb.Frame(close=pb.CloseSession(session_id=self.id)),
                              timeout=2)
        await hang_up(self.stream)


def open_msg(prompt: Sequence[int], max_new_tokens: int = 64,
             model_id: str = "tiny-test") -> pb.OpenSession:
    return pb.OpenSession(model_id=model_id, prompt=list(prompt), client_version=PROTOCOL_VERSION,
                          max_new_tokens=max_new_tokens, sampling=pb.Sampling(top_p=1.0))


async def next_outcome(stream: object, timeout: float) -> Outcome:
    """What the verifier does next on `stream`: a frame, a close, or nothing in time."""
    start = time.monotonic()
    try:
        frame = await read_frame(stream, timeout=timeout)
    except ProtocolError as exc:
        kind = "timeout" if exc.code == ErrorCode.TIMEOUT else (
            "closed" if exc.code == ErrorCode.STREAM_CLOSED else f"local:{exc.code.name}")
        return Outcome(kind, time.monotonic() - start)
    kind = frame.WhichOneof("body")
    if kind == "error":
        out = Outcome(f"error:{from_error(frame.error).code.name}", time.monotonic() - start,
                      frame.error)
    else:
        out = Outcome(f"frame:{kind}", time.monotonic() - start)
    if kind == "result":
        out.result = frame.result  # type: ignore[attr-defined]
    if kind == "opened":
        out.opened = frame.opened  # type: ignore[attr-defined]
    return out


async def probe(stream: object, data: bytes, timeout: float = 10.0, *,
                close_after: bool = True, chunk: int | None = None) -> Outcome:
    """Write raw `data` (optionally in `chunk`-byte writes), optionally half-close our
    side, and report what the verifier does within `timeout` seconds."""
    start = time.monotonic()
    try:
        if chunk:
            for i in range(0, len(data), chunk):
                await stream.write(data[i : i + chunk])
        elif data:
            await stream.write(data)
        if close_after:
            await stream.close()  # our side is done: EOF for the verifier
    except Exception:
        # The verifier may already have answered and closed: read what it said.
        pass
    out = await next_outcome(stream, timeout)
    out.seconds = time.monotonic() - start
    return out


async def hang_up(stream: object) -> None:
    with trio.move_on_after(2) as scope:
        scope.shield = True
        try:
            await stream.reset()
        except Exception:
            pass


@contextlib.asynccontextmanager
async def peers(verifier_addr: str, n: int = 1) -> AsyncIterator[list[Peer]]:
    """`n` fresh identities, each its own running host connected to the verifier."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for _ in range(n):
            kp = create_new_key_pair()
            host = await stack.enter_async_context(
                hosts.running_host(kp, ["/ip4/127.0.0.1/tcp/0"]))
            await hosts.connect(host, verifier_addr)
            out.append(Peer(host, kp, verifier_addr))
        yield out


def run(async_fn, *args: object) -> object:  # noqa: ANN001
    """trio.run with libp2p's INFO chatter (dial storms of its auto-connector, DHT
    noise) held back for the duration; the process's logging is otherwise untouched."""
    quiet = logging.getLogger("libp2p")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return trio.run(async_fn, *args)
    finally:
        quiet.setLevel(level)
