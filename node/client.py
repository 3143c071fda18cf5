"""One verification session over one stream: the node's half of `/specedge/verify/1.0.0`.

The conversation is strictly request/response with at most one request outstanding, so a
session is a plain object whose methods each write one frame and read its answer.
Anything that goes wrong (the verifier refuses, dies, stalls or answers nonsense)
surfaces as a `ProtocolError`; the session is then unusable and the caller fails over to
another verifier. Nothing the verifier sends is trusted: results are checked against the
request they answer and every receipt's signature and request digest are checked before
the tokens are used.

Liveness, not deadlines (see protocol.limits): a 1.1 verifier sends Progress frames while
it works on what we wait for, so a wait ends only when no frame at all came for
`SILENCE_TIMEOUT` (dead or frozen) or when the Progress frames show no progress for
`stall_limit` of the verifier's own estimate. A busy verifier is waited for; a dead one is
left within seconds. A 1.0 verifier sends none, and gets the old fixed timeouts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio
from libp2p.crypto.keys import KeyPair

from specedge.node.receipts import KeptReceipt, RoundContext, check_receipt
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.audits import session_digest
from specedge.protocol.envelopes import request_frame, seal_request
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.identity import peer_id_of
from specedge.protocol.ids import PROTOCOL_VERSION
from specedge.protocol.limits import (
    LEGACY_OPEN_TIMEOUT,
    LEGACY_RESULT_TIMEOUT,
    SILENCE_TIMEOUT,
    stall_limit,
)
from specedge.protocol.validation import (
    expect,
    validate_progress,
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
    standing: bytes = b""  # a StandingStatement envelope to present (see discovery)
    # Alternatives listed at each committed position (the API's top_logprobs). At least
    # two, so the receipt's margin can be checked against the runner-up.
    top_logprobs: int = 2

    def sampling(self) -> pb.Sampling:
        p = self.params
        return pb.Sampling(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                           seed=p.seed)

    def digest(self) -> bytes:
        """What the verifier's receipts must name this session by."""
        msg = self.message()
        return session_digest(self.model_id, msg.prompt, msg.sampling)

    def message(self, progress: bool = True) -> pb.OpenSession:
        return pb.OpenSession(
            model_id=self.model_id,
            revision=self.revision,
            prompt=self.prompt,
            sampling=self.sampling(),
            client_version=PROTOCOL_VERSION,
            max_new_tokens=self.max_new_tokens,
            progress=progress,
            standing=self.standing,
            top_logprobs=max(self.top_logprobs, 2),
        )


@dataclass(frozen=True)
class RoundResult:
    accepted: list[int]  # tree node indices, root to leaf
    bonus: int
    receipt: KeptReceipt
    round_trip_s: float  # request written -> result read (queueing and passes included)


@dataclass
class Liveness:
    """How the node decides that a verifier it waits for is dead or stuck.

    `progress`: the verifier sends Progress frames (protocol 1.1); then `silence` bounds
    the gap between frames and the stall rule bounds time without progress. Otherwise
    `legacy` bounds the whole wait.
    """

    progress: bool = True
    silence: float = SILENCE_TIMEOUT
    legacy: float = LEGACY_RESULT_TIMEOUT


class Session:
    """An open session on one verifier. Use `Session.open`; one caller at a time."""

    def __init__(self, stream: Stream, verifier: str, identity: KeyPair,
                 request: SessionRequest, opened: pb.SessionOpened,
                 liveness: Liveness | None = None) -> None:
        self.stream = stream
        self.liveness = liveness or Liveness()
        self.last_progress: pb.Progress | None = None  # the latest, for status displays
        self.verifier = verifier
        self.identity = identity
        self.node = peer_id_of(identity)
        self.model_id = request.model_id
        self.session_id = bytes(opened.session_id)
        self.vocab_size = int(opened.vocab_size)
        self.max_tree_tokens = int(opened.max_tree_tokens)
        # The verifier's measured pass cost by rows, (rows, seconds): sizes dynamic trees.
        self.pass_costs = [(int(p.rows), p.micros / 1e6) for p in opened.pass_costs]
        self.seq = 0
        self.broken = False
        # The session's transcript, for audits: what it was opened with, and each
        # round's signed request and receipt and the tokens it committed.
        self.request = request
        self.digest = request.digest()
        self.committed: list[int] = []
        self.receipts: list[KeptReceipt] = []
        # Called with each checked round before it is used (a synchronous audit); a
        # ProtocolError from it fails the round like any other verifier failure.
        self.before_use: Callable[[Session], Awaitable[None]] | None = None
        self.on_end: Callable[[], None] | None = None  # told once, when the session ends

    def _ended(self) -> None:
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end()

    @classmethod
    async def open(cls, stream: Stream, verifier: str, identity: KeyPair,
                   request: SessionRequest, liveness: Liveness | None = None) -> Session:
        """Send OpenSession and wait for SessionOpened.

        A 1.1 verifier answers at admission and prefills while we draft (our first
        request waits for it); a 1.0 one answers after its prefill. Raises ProtocolError
        (RemoteError when the verifier refuses, e.g. BUSY with a retry-after); the stream
        is reset on any failure so the verifier frees what it allocated.
        """
        liveness = liveness or Liveness()
        timeout = liveness.silence if liveness.progress else LEGACY_OPEN_TIMEOUT
        try:
            await write_frame(stream, pb.Frame(open=request.message(liveness.progress)))
            frame = await read_frame(stream, timeout=timeout)
            expect(frame, "opened")
            validate_session_opened(frame.opened, expected_peer=verifier)
        except BaseException:
            await _reset(stream)
            raise
        return cls(stream, verifier, identity, request, frame.opened, liveness)

    async def verify(self, tokens: Sequence[int], parents: Sequence[int], *,
                     proactive: bool = False, draft_micros: int = 0) -> RoundResult:
        """Send one signed tree and return the checked verdict with its checked receipt.

        An empty tree asks for the target's next token alone (the first token after a
        prompt comes from the verifier's prefill this way). Silence or a stall (see
        `Liveness`), a closed stream (it died) or an error reply (it refuses) raise
        ProtocolError and mark the session broken.
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
            frame = await self._answer(req.seq)
            elapsed = trio.current_time() - start
            expect(frame, "result")
            res = frame.result
            validate_verify_result(res, req, self.vocab_size)
            p = self.request
            context = RoundContext(self.digest, len(p.prompt) + len(self.committed), p.params,
                                   max(p.top_logprobs, 2), self.vocab_size)
            kept = check_receipt(bytes(res.receipt), envelope, req, res, node=self.node,
                                 verifier=self.verifier, model_id=self.model_id,
                                 context=context)
            self.committed.extend(f.token for f in kept.facts)
            self.receipts.append(kept)
            if self.before_use is not None:
                await self.before_use(self)
        except BaseException:
            self.broken = True
            raise
        return RoundResult([int(i) for i in res.accepted], int(res.bonus_token), kept, elapsed)

    async def _answer(self, seq: int) -> pb.Frame:
        """The verifier's next frame that is not Progress, watching its liveness."""
        if not self.liveness.progress:
            return await read_frame(self.stream, timeout=self.liveness.legacy)
        last_advance = trio.current_time()
        seen: tuple[int, int, int] | None = None  # (state, done, -position) so far
        while True:
            frame = await read_frame(self.stream, timeout=self.liveness.silence)
            if frame.WhichOneof("body") != "progress":
                return frame
            p = frame.progress
            validate_progress(p, session_id=self.session_id, seq=seq)
            self.last_progress = p
            now = trio.current_time()
            mark = (int(p.state), int(p.done), -int(p.queue_position))
            if seen is None or any(a > b for a, b in zip(mark, seen, strict=True)):
                last_advance = now  # a later state, more prefilled, or nearer the front
                seen = mark if seen is None else tuple(  # type: ignore[assignment]
                    max(a, b) for a, b in zip(mark, seen, strict=True))
            limit = stall_limit(p.eta_ms / 1000)
            if now - last_advance > limit:
                raise ProtocolError(ErrorCode.TIMEOUT, f"the verifier reported no progress "
                                    f"for {now - last_advance:.0f} s (limit {limit:.0f} s)")

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
