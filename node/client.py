"""One verification session over one stream: the node's half of `/specedge/verify/1.0.0`.

The conversation is strictly request/response with at most one request outstanding, so a
session is a plain object whose methods each write one frame and read one frame with a
timeout. Anything that goes wrong (the verifier refuses, dies, stalls or answers nonsense)
surfaces as a `ProtocolError`; the session is then unusable and the caller fails over to
another verifier. Nothing the verifier sends is trusted: results are checked against the
request they answer and every receipt's signature and request digest are checked before
the tokens are used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio
from libp2p.crypto.keys import KeyPair

from specedge.node.receipts import KeptReceipt, check_receipt
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import request_frame, seal_request
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.identity import peer_id_of
from specedge.protocol.ids import PROTOCOL_VERSION
from specedge.protocol.limits import HANDSHAKE_TIMEOUT, RESULT_TIMEOUT
from specedge.protocol.validation import (
    expect,
    validate_session_opened,
    validate_verify_result,
)

if TYPE_CHECKING:
    from specedge.sampling import SamplingParams

CLOSE_TIMEOUT = 2.0  # a goodbye is a courtesy: never wait long for it


class Stream(Protocol):
    """What a session needs from a libp2p stream (and what test doubles provide)."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


@dataclass(frozen=True)
class SessionRequest:
    """What to open a session for. `prompt` is everything committed so far (pending last)."""

    model_id: str
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    revision: str = ""

    def message(self) -> pb.OpenSession:
        p = self.params
        return pb.OpenSession(
            model_id=self.model_id,
            revision=self.revision,
            prompt=self.prompt,
            sampling=pb.Sampling(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                 seed=p.seed),
            client_version=PROTOCOL_VERSION,
            max_new_tokens=self.max_new_tokens,
        )


@dataclass(frozen=True)
class RoundResult:
    accepted: list[int]  # tree node indices, root to leaf
    bonus: int
    receipt: KeptReceipt
    round_trip_s: float  # request written -> result read


class Session:
    """An open session on one verifier. Use `Session.open`; one caller at a time."""

    def __init__(self, stream: Stream, verifier: str, identity: KeyPair,
                 request: SessionRequest, opened: pb.SessionOpened) -> None:
        self.stream = stream
        self.verifier = verifier
        self.identity = identity
        self.node = peer_id_of(identity)
        self.model_id = request.model_id
        self.session_id = bytes(opened.session_id)
        self.vocab_size = int(opened.vocab_size)
        self.max_tree_tokens = int(opened.max_tree_tokens)
        self.seq = 0
        self.broken = False
        self.on_end: Callable[[], None] | None = None  # told once, when the session ends

    def _ended(self) -> None:
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end()

    @classmethod
    async def open(cls, stream: Stream, verifier: str, identity: KeyPair,
                   request: SessionRequest, timeout: float = HANDSHAKE_TIMEOUT) -> Session:
        """Send OpenSession and wait for SessionOpened (the verifier prefills meanwhile).

        Raises ProtocolError (RemoteError when the verifier refuses); the stream is reset
        on any failure so the verifier frees what it allocated.
        """
        try:
            await write_frame(stream, pb.Frame(open=request.message()))
            frame = await read_frame(stream, timeout=timeout)
            expect(frame, "opened")
            validate_session_opened(frame.opened, expected_peer=verifier)
        except BaseException:
            await _reset(stream)
            raise
        return cls(stream, verifier, identity, request, frame.opened)

    async def verify(self, tokens: Sequence[int], parents: Sequence[int], *,
                     proactive: bool = False, draft_micros: int = 0,
                     timeout: float = RESULT_TIMEOUT) -> RoundResult:
        """Send one signed tree and return the checked verdict with its checked receipt.

        A timeout (the verifier stalls), a closed stream (it died) or an error reply (it
        refuses) raise ProtocolError and mark the session broken.
        """
        if self.broken:
            raise ProtocolError(ErrorCode.STREAM_CLOSED, "session is broken")
        self.seq += 1
        req = pb.VerifyRequest(session_id=self.session_id, seq=self.seq, tokens=list(tokens),
                               parents=list(parents), proactive=proactive,
                               draft_micros=max(0, int(draft_micros)))
        envelope = seal_request(self.identity, req)
        try:
            start = trio.current_time()
            await write_frame(self.stream, request_frame(envelope))
            frame = await read_frame(self.stream, timeout=timeout)
            elapsed = trio.current_time() - start
            expect(frame, "result")
            res = frame.result
            validate_verify_result(res, req, self.vocab_size)
            kept = check_receipt(bytes(res.receipt), envelope, req, res, node=self.node,
                                 verifier=self.verifier, model_id=self.model_id)
        except BaseException:
            self.broken = True
            raise
        return RoundResult([int(i) for i in res.accepted], int(res.bonus_token), kept, elapsed)

    async def close(self, reason: str = "done") -> None:
        """Say goodbye and close the stream; bounded, never raises (the work is done)."""
        self._ended()
        if not self.broken:
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await write_frame(self.stream, pb.Frame(close=pb.CloseSession(
                        session_id=self.session_id, reason=reason[:200])), timeout=CLOSE_TIMEOUT)
                    await self.stream.close()
                    return
                except Exception:
                    pass
        await _reset(self.stream)

    async def abort(self) -> None:
        """Drop the session at once (after a failure): reset, never raises."""
        self._ended()
        self.broken = True
        await _reset(self.stream)


async def _reset(stream: Stream) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT) as scope:
        scope.shield = True
        try:
            await stream.reset()
        except Exception:
            pass
