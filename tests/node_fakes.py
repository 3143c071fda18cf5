"""An in-process verifier that speaks the real wire protocol over memory streams.

It exists so the node's drafting loop, failover and receipt checks can be tested in one
process in milliseconds; the multi-process tests run the real `specedge-verifier`. It
uses the core's `TargetSession` (the verifier daemon's reference) and can be told to
die, stall, refuse or lie at a chosen round.
"""

from __future__ import annotations

import hashlib
import os
import time

import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair

from specedge.node.client import Liveness, Session, SessionRequest
from specedge.node.generation import NoVerifierError
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.audits import session_digest
from specedge.protocol.envelopes import frame_envelope_bytes, open_request, seal_receipt
from specedge.protocol.errors import ErrorCode, ProtocolError, error_frame
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.identity import peer_id_of
from specedge.protocol.validation import validate_verify_request
from specedge.sampling import SamplingParams
from specedge.verification import TargetSession
from specedge.verifier.receipts import position_message


class MemStream:
    """A trio memory stream with the libp2p stream methods a Session uses."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.s = stream

    async def read(self, n: int | None = None) -> bytes:
        return await self.s.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.s.send_all(data)

    async def close(self) -> None:
        await self.s.aclose()

    async def reset(self) -> None:
        await self.s.aclose()


class FakeVerifier:
    """One verifier. `die_at` / `stall_at` / `refuse_at`: the round (1-based, counted over
    all its sessions) at which it closes the stream instead of answering, stops
    answering, or answers an Error. `bad_receipt_at`: it signs a wrong digest.
    `refuse_open`: every OpenSession gets OVERLOADED. `busy_opens`: that many OpenSessions
    (-1: all) get BUSY with `retry_after` seconds. `queue_depth`: what it advertises."""

    def __init__(self, model, *, model_id: str = "tiny-test", max_tree: int = 64,
                 vocab_size: int | None = None, die_at: int | None = None,
                 stall_at: int | None = None, refuse_at: int | None = None,
                 bad_receipt_at: int | None = None, refuse_open: bool = False,
                 busy_opens: int = 0, retry_after: float = 0.2, queue_depth: int = 0,
                 pass_costs: list[tuple[int, int]] = ()) -> None:
        self.model = model
        self.pass_costs = [pb.PassCost(rows=r, micros=us) for r, us in pass_costs]
        self.model_id = model_id
        self.key = create_new_key_pair()
        self.peer = peer_id_of(self.key)
        self.max_tree = max_tree
        self.vocab_size = vocab_size or int(model.get_output_embeddings().weight.shape[0])
        self.die_at, self.stall_at, self.refuse_at = die_at, stall_at, refuse_at
        self.bad_receipt_at = bad_receipt_at
        self.refuse_open = refuse_open
        self.busy_opens, self.retry_after = busy_opens, retry_after
        self.queue_depth = queue_depth
        self.busy_refusals = 0
        self.rounds = 0
        self.sessions = 0
        self.receipts: list[bytes] = []

    async def serve(self, stream: MemStream, node_peer: str) -> None:
        try:
            await self._serve(stream, node_peer)
        except ProtocolError:
            pass
        finally:
            await stream.close()

    async def _serve(self, stream: MemStream, node_peer: str) -> None:
        frame = await read_frame(stream)
        msg = frame.open
        if self.refuse_open:
            await write_frame(stream, error_frame(ProtocolError(ErrorCode.OVERLOADED, "full")))
            return
        if self.busy_opens < 0 or self.busy_refusals < self.busy_opens:
            self.busy_refusals += 1
            await write_frame(stream, error_frame(ProtocolError(
                ErrorCode.BUSY, "all slots taken", retry_after=self.retry_after)))
            return
        s = msg.sampling
        params = SamplingParams(s.temperature, s.top_p or 1.0, s.top_k, s.seed)
        target = TargetSession(self.model, list(msg.prompt), params)
        target.top_logprobs = msg.top_logprobs
        await trio.to_thread.run_sync(target.prefill)
        self.sessions += 1
        session_id = os.urandom(16)
        await write_frame(stream, pb.Frame(opened=pb.SessionOpened(
            session_id=session_id, verifier_peer_id=self.peer, vocab_size=self.vocab_size,
            max_tree_tokens=self.max_tree, pass_costs=self.pass_costs)))
        seq = 0
        while True:
            frame = await read_frame(stream, timeout=30)
            if frame.WhichOneof("body") == "close":
                return
            env = frame_envelope_bytes(frame)
            _, req = open_request(env, expected_peer=node_peer)
            validate_verify_request(req, self.vocab_size, self.max_tree, seq,
                                    session_id=session_id)
            seq = req.seq
            self.rounds += 1
            if self.rounds == self.die_at:
                return  # the stream closes: the node reads EOF
            if self.rounds == self.stall_at:
                await trio.sleep_forever()
            if self.rounds == self.refuse_at:
                await write_frame(stream, error_frame(
                    ProtocolError(ErrorCode.SHUTTING_DOWN, "going away"), session_id, seq))
                return
            t0 = time.perf_counter()
            first = len(target.tokens)
            verdict = await trio.to_thread.run_sync(target.verify, list(req.tokens),
                                                    list(req.parents))
            digest = hashlib.sha256(env).digest()
            if self.rounds == self.bad_receipt_at:
                digest = bytes(32)
            receipt = pb.Receipt(
                verifier_peer_id=self.peer, node_peer_id=node_peer, session_id=session_id,
                seq=seq, request_sha256=digest, drafted=len(req.tokens),
                accepted=len(verdict.accepted),
                verify_micros=int((time.perf_counter() - t0) * 1e6) + 1,
                unix_ms=int(time.time() * 1000), model_id=self.model_id,
                draft_micros=req.draft_micros,
                positions=[position_message(f) for f in verdict.facts],
                session_sha256=session_digest(msg.model_id, msg.prompt, msg.sampling),
                engine="torch/float32", first_position=first)
            sealed = seal_receipt(self.key, receipt)
            self.receipts.append(sealed)
            await write_frame(stream, pb.Frame(result=pb.VerifyResult(
                session_id=session_id, seq=seq, accepted=verdict.accepted,
                bonus_token=verdict.bonus, receipt=sealed)))


class FakeConnector:
    """A `generation.Connector` over FakeVerifiers; serves them in the caller's nursery.

    `liveness`: what the node assumes of them (default: a 1.1 verifier that answers
    within a short silence; FakeVerifier sends no Progress, so a stall is silence)."""

    def __init__(self, nursery: trio.Nursery, identity, verifiers: list[FakeVerifier],
                 liveness: Liveness | None = None) -> None:
        self.nursery = nursery
        self.identity = identity
        self.verifiers = verifiers
        self.liveness = liveness or Liveness(progress=True, silence=2.0)
        self.opened: list[str] = []
        self.failures: list[tuple[str, str]] = []

    def failed(self, verifier: str, reason: str) -> None:
        self.failures.append((verifier, reason))

    async def open_session(self, request: SessionRequest, avoid: set[str]) -> Session:
        reasons = []
        for v in self.verifiers:
            if v.peer in avoid:
                continue
            client, server = trio.testing.memory_stream_pair()
            self.nursery.start_soon(v.serve, MemStream(server), peer_id_of(self.identity))
            try:
                session = await Session.open(MemStream(client), v.peer, self.identity, request,
                                             self.liveness)
            except ProtocolError as exc:
                reasons.append(str(exc))
                continue
            self.opened.append(v.peer)
            return session
        raise NoVerifierError("no verifier: " + "; ".join(reasons))


# ---------------------------------------------------------------------------- over libp2p


def advertisement(fake: FakeVerifier) -> pb.Advertisement:
    from specedge.protocol.ids import PROTOCOL_VERSION

    return pb.Advertisement(model_id=fake.model_id, max_batch_tokens=1024, free_slots=4,
                            queue_depth=fake.queue_depth, mean_verify_micros=1000,
                            protocol_version=PROTOCOL_VERSION, max_tree_tokens=fake.max_tree,
                            vocab_size=fake.vocab_size)


async def serve_on_host(host, fake: FakeVerifier) -> None:
    """Install the verify and advert handlers of `fake` on a running libp2p host."""
    from specedge.protocol.ids import ADVERT_PROTOCOL, VERIFY_PROTOCOL

    async def verify(stream) -> None:
        try:
            await fake.serve(stream, stream.muxed_conn.peer_id.to_base58())
        except Exception:
            pass  # a handler that raises takes the host down

    async def advert(stream) -> None:
        try:
            await read_frame(stream, timeout=5)
            await write_frame(stream, pb.Frame(advert=advertisement(fake)))
            await stream.close()
        except Exception:
            pass

    host.set_stream_handler(VERIFY_PROTOCOL, verify)
    host.set_stream_handler(ADVERT_PROTOCOL, advert)
