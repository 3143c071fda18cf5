"""The auditor's side of `/specedge/audit/1.0.0`: replay a transcript, sign the answer.

A node sends a signed AuditRequest (a session's prompt, sampling and committed tokens,
never the first verifier's answers) to a verifier that did not serve the session. The
auditor runs the transcript through its target in one prefill-style forward pass
(the engine's `audit_facts`), and answers, signed, with its own choice at every committed
position and how far each committed token trailed it. One exchange per stream; refusals
are Error frames as on the verify protocol. Audits run one at a time, in prefill-sized
chunks that take turns with the scheduler's passes (the engine's lock), so a long replay
never stalls the sessions being served; their time is counted apart
(`specedge_audit_seconds`), so the cost of auditing shows next to the cost of verifying.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream

from specedge.kvblocks import MemoryFull
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.audits import open_audit_request, seal_audit_answer
from specedge.protocol.envelopes import request_digest, request_envelope
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.limits import FRAME_LIMITS, HANDSHAKE_TIMEOUT, MAX_VERIFY_MICROS
from specedge.protocol.validation import expect
from specedge.verifier.sessions import sampling_params

if TYPE_CHECKING:
    from specedge.verifier.host import Verifier

_ONE_AT_A_TIME = trio.CapacityLimiter(1)


async def serve_audit(verifier: Verifier, stream: INetStream) -> None:
    """Answer one AuditRequest on `stream` (raises ProtocolError to refuse it)."""
    frame = await read_frame(stream, max_size=FRAME_LIMITS["audit_request"],
                             timeout=HANDSHAKE_TIMEOUT)
    expect(frame, "audit_request")
    envelope = frame.audit_request.SerializeToString()
    _, req = open_audit_request(envelope, expected_peer=str(stream.muxed_conn.peer_id),
                                vocab_size=verifier.config.vocab_size)
    if req.model_id != verifier.config.model_id:
        raise ProtocolError(ErrorCode.UNSUPPORTED_MODEL,
                            f"this verifier serves {verifier.config.model_id!r}")
    if len(req.prompt) + len(req.committed) > verifier.config.max_context_tokens:
        raise ProtocolError(ErrorCode.LIMIT_REACHED, "transcript longer than the context")
    params = sampling_params(req.sampling)
    start = time.perf_counter()
    engine = verifier.engine
    try:
        facts = await trio.to_thread.run_sync(
            lambda: engine.audit_facts(list(req.prompt), list(req.committed), params),
            limiter=_ONE_AT_A_TIME)
    except MemoryFull as exc:
        raise ProtocolError(ErrorCode.BUSY, f"no room for the replay: {exc}") from None
    seconds = time.perf_counter() - start
    verifier.metrics.record_audit(seconds, len(req.committed))
    answer = pb.AuditAnswer(
        auditor_peer_id=verifier.peer_id, request_sha256=request_digest(envelope),
        model_id=verifier.config.model_id, engine=verifier.engine_name,
        positions=[pb.AuditPosition(token=f.token, logprob=f.logprob, margin=f.margin,
                                    deficit=f.deficit) for f in facts],
        audit_micros=min(int(seconds * 1e6), MAX_VERIFY_MICROS),
        unix_ms=int(time.time() * 1000))
    signed = seal_audit_answer(verifier.key_pair, answer)
    await write_frame(stream, pb.Frame(audit_answer=request_envelope(signed)))
