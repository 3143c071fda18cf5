"""The verifier daemon: libp2p streams in, batched verifications, signed receipts out.

Wire conversation (the node implements the other side exactly like this)
-----------------------------------------------------------------------
Verify protocol ``/specedge/verify/1.0.0`` (``protocol.ids.VERIFY_PROTOCOL``), one stream
per session, every record a length-prefixed ``Frame`` (``protocol.framing``):

1. node -> ``Frame(open=OpenSession)`` within ``HANDSHAKE_TIMEOUT``. The verifier checks it
   (``validate_open_session``: version, model id, revision when both name one, prompt,
   sampling, context) and admits it: BUSY with a retry-after when no session slot is
   free or when its prefill could not start within ``--admit-wait`` (queued prompt rows
   over the measured prefill speed); OVERLOADED when this peer holds its share. Then,
   for a 1.1 node (``OpenSession.progress``), it answers ``Frame(opened=SessionOpened)``
   at once (a fresh 16-byte session id, its peer id, the vocabulary size and the largest
   tree it accepts) and prefills ``prompt[:-1]`` (chunked, between other sessions'
   rounds) while the node drafts; the node's first request may arrive before the prefill
   is done and then waits for it. A 1.0 node gets SessionOpened after the prefill. Any
   refusal is ``Frame(error=Error)`` and the stream is closed.
   Liveness (1.1): while the node waits for an answer (its request queued, prefilling
   or in a pass) the verifier sends ``Frame(progress=Progress)`` at least every
   ``HEARTBEAT_INTERVAL`` (state, queue position, tokens prefilled, an estimate from
   measured speed), at once when the prefill is still under way. A node's first request
   can be an empty tree: its answer is the target's first token after the prompt (one
   prefill and one step, as in plain decoding), with a receipt.
2. Rounds, at most one request outstanding: node -> ``Frame(verify=Envelope)`` holding a
   ``VerifyRequest`` signed by the node (domain "specedge-verify-request"); verifier ->
   ``Frame(result=VerifyResult)`` (accepted node indices root to leaf, the bonus token,
   the verifier-signed ``Receipt`` envelope) or ``Frame(error=Error)`` carrying the
   session id and the request's seq. A refused request changes nothing: bad signature
   (BAD_SIGNATURE), signed by anyone but the stream's remote peer (WRONG_PEER), another
   session id (UNKNOWN_SESSION), seq <= last answered (REPLAYED_SEQUENCE) or > last + 1
   (SKIPPED_SEQUENCE), ids >= vocab (TOKEN_OUT_OF_VOCAB), parents not pointing strictly
   backwards (BAD_TREE), more tokens than announced (TREE_TOO_LARGE), max_new_tokens
   already generated (LIMIT_REACHED), an unexpected frame kind (UNEXPECTED_MESSAGE). The
   node may send a correct request next.
3. End: node -> ``Frame(close=CloseSession)`` or it closes the stream; the verifier frees
   the session. Framing errors (bytes that are not a frame, an oversized frame) are
   answered with MALFORMED / TOO_LARGE and end the session: the stream is out of sync.
   A session idle for ``--idle-timeout`` seconds gets TIMEOUT and ends; a vanished or
   frozen node (health monitor) is reaped the same way. On shutdown an idle session
   gets SHUTTING_DOWN; a request already received is answered first.

Streams that hold no session yet (waiting for their OpenSession, or an advert query)
are bounded: at most ``max_sessions_per_peer`` per peer and ``max_sessions`` in all. A
stream over either bound is answered OVERLOADED at once, before anything is read, so a
flood of streams that never finish their first frame costs a bounded amount of memory
(each may buffer up to one frame limit until its timeout).

Semantics: the session's KV cache holds ``prompt[:-1]``; ``prompt[-1]`` is the pending
token. A request's tree hangs off the pending token (parent -1). The accepted path and
the bonus token are committed and the bonus becomes the new pending token: exactly
``specedge.verification.TargetSession``. Sampling uses the request-independent
``SamplingParams(temperature, top_p or 1.0, top_k, seed)`` as received (float32 values).

Advert protocol ``/specedge/advert/1.0.0``: node -> ``Frame(advert_query=AdvertQuery)``;
verifier -> ``Frame(advert=Advertisement)`` with live figures (free session slots, queue
depth, mean submit-to-result time of recent requests, open sessions, tokens committed
since start, max batch tokens, max tree tokens, vocab size, model id and revision), or
Error UNSUPPORTED_MODEL when the query names another model. One exchange per stream.

Discovery: the verifier provides ``dht_key(model_id)`` (a CID) on the Kademlia DHT,
checks through GET_PROVIDERS that the record is found, and re-announces every
``REANNOUNCE_INTERVAL`` seconds (sooner while the check fails).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT

from specedge.kvblocks import MemoryFull
from specedge.protocol import hosts
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.audits import session_digest
from specedge.protocol.envelopes import (
    frame_envelope_bytes,
    open_request,
    open_statement,
    seal_statement,
)
from specedge.protocol.errors import ErrorCode, ProtocolError, error_frame
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.gossip import fraud_gossip
from specedge.protocol.identity import peer_id_of
from specedge.protocol.ids import (
    ADVERT_PROTOCOL,
    AUDIT_PROTOCOL,
    PROTOCOL_VERSION,
    VERIFY_PROTOCOL,
    dht_key,
    legacy_dht_key,
)
from specedge.protocol.limits import (
    ADMIT_WAIT,
    ADVERT_TIMEOUT,
    BATCH_WAIT,
    FRAME_LIMITS,
    HANDSHAKE_TIMEOUT,
    HEARTBEAT_INTERVAL,
    IDLE_TIMEOUT,
    MAX_ETA_MS,
    MAX_FREE_SLOTS,
    MAX_QUEUE_DEPTH,
    MAX_SESSIONS,
    MAX_STANDING,
    MAX_VERIFY_MICROS,
)
from specedge.protocol.validation import (
    expect,
    validate_advert_query,
    validate_close_session,
    validate_open_session,
    validate_statement,
    validate_verify_request,
)
from specedge.verifier.audit import serve_audit
from specedge.verifier.engine import TargetEngine
from specedge.verifier.metrics import VerifierMetrics
from specedge.verifier.reach import Reach, ReachConfig
from specedge.verifier.receipts import Ingest, ReceiptWriter, make_receipt
from specedge.verifier.scheduler import Outcome, Scheduler
from specedge.verifier.sessions import Session, SessionTable, new_session_id, sampling_params
from specedge.verifier.standing import (
    GRANT,
    HALF_LIFE_S,
    MAX_STATEMENT_AGE_S,
    RESERVED_SLOTS,
    Standings,
    standing_class,
)

log = logging.getLogger("specedge.verifier")

CLOSE_TIMEOUT = 2.0  # seconds to close a stream politely before giving up on it
STANDING_LOOKUP_WAIT = 2.0  # a new peer's standing: never let a slow ledger stall an open
_PROGRESS_STATES = {"queued": pb.Progress.QUEUED, "prefilling": pb.Progress.PREFILLING,
                    "verifying": pb.Progress.VERIFYING}


@dataclass
class VerifierConfig:
    model_id: str
    vocab_size: int
    max_context_tokens: int
    revision: str = ""
    listen: list[str] = field(default_factory=lambda: [hosts.DEFAULT_LISTEN])
    bootstrap: list[str] = field(default_factory=list)
    max_batch_tokens: int = 1024
    max_tree_tokens: int = 64
    batch_wait: float = BATCH_WAIT  # hold for due sessions, in mean passes
    admit_wait: float = ADMIT_WAIT  # BUSY when a new session's prefill could not start sooner
    rank_by_standing: bool = True  # under load, earned standing goes first (standing.py)
    standing_boost: float = 1.0  # mean passes of head start per doubling of standing
    accept_standing_from: list[str] = field(default_factory=list)  # trusted issuers
    max_sessions: int = 64
    max_sessions_per_peer: int = 16
    idle_timeout: float = IDLE_TIMEOUT
    drain_timeout: float = 10.0  # seconds shutdown waits for rounds in flight
    announce_file: str | None = None
    dht: bool = True
    reannounce_interval: float = hosts.REANNOUNCE_INTERVAL
    gossip: bool = True  # relay fraud proofs (protocol.gossip)
    reach: ReachConfig = field(default_factory=ReachConfig)  # NAT: dial-back, relays, UPnP
    # (rows, microseconds) of the engine's passes, measured at start (verifier/costprobe.py)
    pass_costs: list[tuple[int, int]] = field(default_factory=list)


class Verifier:
    """One verifier host: sessions, scheduler, receipts, libp2p handlers."""

    def __init__(self, engine: TargetEngine, key_pair: KeyPair, config: VerifierConfig,
                 ledger: Ingest | None = None, metrics: VerifierMetrics | None = None) -> None:
        if config.max_tree_tokens >= config.max_batch_tokens:
            raise ValueError("max_tree_tokens must be below max_batch_tokens (the root "
                             "takes a row)")
        self.engine = engine
        self.key_pair = key_pair
        self.peer_id = peer_id_of(key_pair)
        self.config = config
        self.metrics = metrics or VerifierMetrics()
        reserved = int(config.max_sessions * RESERVED_SLOTS) if config.rank_by_standing else 0
        self.table = SessionTable(config.max_sessions, config.max_sessions_per_peer, reserved)
        self.standings = Standings(ledger if hasattr(ledger, "earned_buckets") else None)
        self.scheduler = Scheduler(
            engine, config.max_batch_tokens, self.metrics, batch_wait=config.batch_wait,
            standing=self._standing, rank=config.rank_by_standing,
            boost_passes=config.standing_boost)
        self.writer = ReceiptWriter(ledger, self.metrics)
        self.engine_name = getattr(engine, "name", None) or \
            f"torch/{str(engine.dtype).removeprefix('torch.')}"
        self.addrs: list[str] = []
        self.provided = hosts.ProvideStatus(dht_key(config.model_id))  # the DHT record's fate
        self.reach = Reach(config.reach, config.bootstrap, self.provided)  # NAT, relays
        self._nursery: trio.Nursery | None = None
        self._dht: KadDHT | None = None
        self.stopping = False
        self._handlers = 0
        self._handlers_done = trio.Event()
        self._idle_scopes: set[trio.CancelScope] = set()
        self._drain_deadline = math.inf
        # Streams not yet holding a session, per peer and in all (see the docstring).
        self._unopened: dict[str, int] = {}
        self._unopened_total = 0

    # -- lifecycle ----------------------------------------------------------------

    async def serve(self, stop: trio.Event, *,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop` is set, then shut down in order (see `_shutdown`)."""
        async with trio.open_nursery() as outer:
            await outer.start(self.writer.run)
            async with trio.open_nursery() as core:
                await core.start(self.scheduler.run)
                core.start_soon(self._refresh_standings)
                async with hosts.running_host(self.key_pair, self.config.listen,
                                              upnp=self.config.reach.upnp) as host:
                    host.set_stream_handler(VERIFY_PROTOCOL, self._verify_handler)
                    host.set_stream_handler(ADVERT_PROTOCOL, self._advert_handler)
                    host.set_stream_handler(AUDIT_PROTOCOL, self._audit_handler)
                    async with self._discovery(host), self._gossip(host):
                        self.addrs = hosts.peer_addrs(host)
                        for addr in self.addrs:
                            print(addr, flush=True)
                        if self.config.announce_file:
                            hosts.write_announce_file(self.config.announce_file, self.addrs)
                        log.info("verifier %s serving %s", self.peer_id, self.config.model_id)
                        task_status.started(self.addrs)
                        await stop.wait()
                        await self._shutdown()
            self.writer.close()
        log.info("stopped")

    async def _refresh_standings(self) -> None:
        """Recompute the standing of peers seen lately, off the event loop (a ledger query
        blocks), until shutdown."""
        while not self.stopping:
            if self.standings.stale:
                await trio.to_thread.run_sync(self.standings.refresh)
            await trio.sleep(1.0)

    def _standing(self, session: Session) -> float:
        return self.standings.earned(session.peer)

    @contextlib.asynccontextmanager
    async def _discovery(self, host: IHost) -> AsyncIterator[None]:
        """The DHT and the periodic provider record, while serving."""
        if not self.config.dht:
            yield
            return
        # Reachability first: behind NAT the DHT runs as a client, so that nobody's
        # lookup waits on dials to an address it cannot reach (reach.py).
        async with self.reach.running(host, on_change=self._reannounce), hosts.running_dht(
                host, server=self.reach.dht_server, bootstrap=self.config.bootstrap) as dht:
            async with trio.open_nursery() as nursery:
                self._nursery, self._dht = nursery, dht
                self.reach.on_mode = lambda server: nursery.start_soon(
                    dht.switch_mode, DHTMode.SERVER if server else DHTMode.CLIENT)
                # Started after the first announcement, so "ready" (the announce file)
                # means "findable": a verifier restarted on a new address is otherwise
                # looked up at its old one by nodes that ask right away.
                await nursery.start(
                    lambda task_status: hosts.provide_forever(
                        dht, dht_key(self.config.model_id),
                        also=[legacy_dht_key(self.config.model_id)],  # until 2.0 (README)
                        interval=self.config.reannounce_interval, status=self.provided,
                        task_status=task_status))
                yield
                nursery.cancel_scope.cancel()

    def _gossip(self, host: IHost) -> contextlib.AbstractAsyncContextManager[object]:
        """Relay fraud proofs on the network's pubsub topic (protocol.gossip)."""
        if not self.config.gossip:
            return contextlib.nullcontext()
        return fraud_gossip(host)

    def _reannounce(self) -> None:
        """Announce again now: the relayed address changed (reach.py)."""
        if self._nursery is not None and self._dht is not None:
            self._nursery.start_soon(hosts.provide_once, self._dht,
                                     dht_key(self.config.model_id))

    async def _shutdown(self) -> None:
        """Stop accepting, answer what is in flight, then let the nurseries unwind.

        Idle sessions get SHUTTING_DOWN at once; requests already received are
        verified and answered (up to `drain_timeout`, after which queued ones get
        SHUTTING_DOWN); the receipt writer drains after the handlers are gone.
        """
        self.stopping = True
        self._drain_deadline = trio.current_time() + self.config.drain_timeout
        for scope in list(self._idle_scopes):
            scope.cancel()
        with trio.move_on_at(self._drain_deadline):
            if self._handlers:
                await self._handlers_done.wait()
        self.scheduler.fail_queued(ProtocolError(ErrorCode.SHUTTING_DOWN,
                                                 "the verifier is shutting down"))
        self.scheduler.close()
        with trio.move_on_after(CLOSE_TIMEOUT):
            if self._handlers:
                await self._handlers_done.wait()

    @contextlib.contextmanager
    def _unopened_slot(self, peer: str) -> Iterator[None]:
        """Count a stream that holds no session yet; OVERLOADED past the bounds.

        Without this bound, streams that never finish their first frame (slow loris)
        each hold a handler and up to a frame's worth of buffered bytes for the
        handshake timeout, and fresh identities cost nothing: 1000 such streams
        from 4 peers grew the daemon by 260 MB.
        """
        if (self._unopened_total >= self.config.max_sessions
                or self._unopened.get(peer, 0) >= self.config.max_sessions_per_peer):
            raise ProtocolError(ErrorCode.OVERLOADED,
                                "too many streams waiting for their first frame")
        self._unopened[peer] = self._unopened.get(peer, 0) + 1
        self._unopened_total += 1
        try:
            yield
        finally:
            self._unopened_total -= 1
            left = self._unopened[peer] - 1
            if left:
                self._unopened[peer] = left
            else:
                del self._unopened[peer]

    @contextlib.contextmanager
    def _handler(self) -> Iterator[None]:
        # Counts running stream handlers, so shutdown can wait for them.
        if self._handlers == 0:
            self._handlers_done = trio.Event()
        self._handlers += 1
        try:
            yield
        finally:
            self._handlers -= 1
            if self._handlers == 0:
                self._handlers_done.set()

    # -- the verify protocol ----------------------------------------------------

    async def _verify_handler(self, stream: INetStream) -> None:
        # A handler that raises takes the whole libp2p host down: contain everything.
        with self._handler():
            try:
                await self._serve_stream(stream)
            except Exception:
                log.exception("verify stream failed")
            finally:
                await _close(stream)

    async def _serve_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        msg = await self._read_open(stream, peer)
        if msg is None:
            return
        try:
            state = self.engine.new_state(list(msg.prompt), sampling_params(msg.sampling),
                                          msg.max_new_tokens)
            state.top_logprobs = msg.top_logprobs
        except MemoryFull as exc:
            self.table.release(peer)
            await self._send_error(stream, ProtocolError(
                ErrorCode.BUSY, f"not enough KV memory for this session now: {exc}",
                retry_after=self.table.slot_wait()))
            return
        session = Session(new_session_id(), peer, state, msg.max_new_tokens,
                          progress=msg.progress)
        session.digest = session_digest(msg.model_id, msg.prompt, msg.sampling)
        self.table.add(session)
        self.metrics.sessions_opened.inc()
        self._gauges()
        reason = "closed"
        try:
            reason = await self._run_session(stream, session)
        finally:
            self.table.remove(session)
            self.scheduler.forget(session)
            self.engine.release(session.state)
            self.table.release(peer)
            self.metrics.sessions_closed.labels(reason=reason).inc()
            self._gauges()
            log.debug("session %s of %s ended: %s", session.id.hex(), peer, reason)

    async def _read_open(self, stream: INetStream, peer: str) -> pb.OpenSession | None:
        """The stream's OpenSession with a slot reserved for it, or None (refused)."""
        try:
            if self.stopping:
                raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the verifier is shutting down")
            with self._unopened_slot(peer):
                frame = await read_frame(stream, timeout=HANDSHAKE_TIMEOUT)
            expect(frame, "open")
            msg = frame.open
            validate_open_session(
                msg, vocab_size=self.config.vocab_size, model_id=self.config.model_id,
                revision=self.config.revision or None,
                max_context_tokens=self.config.max_context_tokens,
            )
            sampling_params(msg.sampling)
            self._admit()
            if msg.standing:
                self._take_statement(peer, bytes(msg.standing))
            if not self.standings.knows(peer):  # a peer new to us: ask the ledger now
                with trio.move_on_after(STANDING_LOOKUP_WAIT):
                    await trio.to_thread.run_sync(self.standings.refresh, {peer})
            self.table.reserve(peer, earned=self.standings.earned(peer) > GRANT)
        except ProtocolError as exc:
            if exc.code != ErrorCode.STREAM_CLOSED:
                await self._send_error(stream, exc)
            return None
        return msg

    def _take_statement(self, peer: str, data: bytes) -> None:
        """Count a standing statement another verifier signed for `peer`, if we accept
        its issuer; a bad one is refused (WRONG_PEER, BAD_SIGNATURE...), not ignored,
        so a node learns its statement does not count here."""
        _, st = open_statement(data)
        validate_statement(st, node=peer, issuers=self.config.accept_standing_from,
                           now_ms=int(time.time() * 1000), max_age_s=MAX_STATEMENT_AGE_S)
        age_s = max(time.time() - st.as_of_unix_ms / 1000, 0.0)
        self.standings.accept_claim(peer, GRANT + st.earned * 2.0 ** (-age_s / HALF_LIFE_S))

    def _admit(self) -> None:
        """BUSY, at once, when a new session's prefill could not start within
        `admit_wait` seconds (queued prompt rows over the measured prefill speed):
        accepting it would only stall it, and the node can go elsewhere or come back."""
        wait = self.scheduler.admission_wait()
        if wait > self.config.admit_wait:
            self.metrics.admissions_refused.inc()
            raise ProtocolError(
                ErrorCode.BUSY,
                f"{self.scheduler.queued_prefill_rows()} prompt tokens are queued ahead "
                f"(about {wait:.0f} s at {self.scheduler.prefill_rows_per_s:.0f} tokens/s); "
                f"this verifier admits sessions that can start within "
                f"{self.config.admit_wait:g} s",
                retry_after=wait - self.config.admit_wait + 1.0)

    async def _run_session(self, stream: INetStream, session: Session) -> str:
        """Prefill and SessionOpened (in the order the node's version expects), then
        rounds; return why the session ended."""
        if not session.progress:  # 1.0 nodes: SessionOpened means "prefilled"
            await self._prefill(session)
            if session.prefill_error is not None:
                await self._send_error(stream, session.prefill_error)
                return session.prefill_error.code.name.lower()
            if not await self._write(stream, session, self._opened(session)):
                return "stream_closed"
            return await self._rounds(stream, session)
        if not await self._write(stream, session, self._opened(session)):
            return "stream_closed"
        async with trio.open_nursery() as nursery:
            # The prompt goes through the model while the node drafts; its first
            # request waits for it (`_round`).
            nursery.start_soon(self._prefill, session)
            reason = await self._rounds(stream, session)
            nursery.cancel_scope.cancel()
        return reason

    def _opened(self, session: Session) -> pb.Frame:
        return pb.Frame(opened=pb.SessionOpened(
            session_id=session.id, verifier_peer_id=self.peer_id,
            vocab_size=self.config.vocab_size, max_tree_tokens=self.config.max_tree_tokens,
            pass_costs=self._pass_costs(),
        ))

    def _pass_costs(self) -> list[pb.PassCost]:
        return [pb.PassCost(rows=r, micros=min(us, MAX_VERIFY_MICROS))
                for r, us in self.config.pass_costs]

    async def _prefill(self, session: Session) -> None:
        """Prefill the session's prompt; record a failure for its first request."""
        try:
            await self.scheduler.prefill(session)
        except ProtocolError as exc:
            session.prefill_error = exc
        finally:
            session.ready.set()
            self._gauges()

    async def _rounds(self, stream: INetStream, session: Session) -> str:
        """Answer requests until the node closes, goes idle, breaks the stream or the
        verifier shuts down; return why."""
        while True:
            if self.stopping:
                if await self._send_error(stream, ProtocolError(
                        ErrorCode.SHUTTING_DOWN, "the verifier is shutting down"), session.id):
                    await self._linger(stream)
                return "shutdown"
            frame = None
            with self._idle() as scope:
                try:
                    frame = await read_frame(stream, timeout=self.config.idle_timeout)
                except ProtocolError as exc:
                    if exc.code == ErrorCode.STREAM_CLOSED:
                        return "stream_closed"
                    if exc.code == ErrorCode.TIMEOUT:
                        exc = ProtocolError(ErrorCode.TIMEOUT, "session idle too long; closed")
                    await self._send_error(stream, exc, session.id)
                    return exc.code.name.lower()
            if scope.cancelled_caught or frame is None:
                continue  # shutdown began while idle: answered at the top of the loop
            kind = frame.WhichOneof("body")
            if kind == "close":
                with contextlib.suppress(ProtocolError):
                    validate_close_session(frame.close, session_id=session.id)
                return "closed"
            if kind != "verify":
                await self._send_error(stream, ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"expected verify or close, got {kind}"),
                    session.id)
                continue
            if not await self._round(stream, session, frame):
                return "stream_closed"
            if session.prefill_error is not None:
                return session.prefill_error.code.name.lower()

    async def _linger(self, stream: INetStream) -> None:
        """Keep the stream open until the node has read our last frame and closed it.

        py-libp2p discards frames a peer has not read yet when the connection goes
        away, so a verifier that exits right after its SHUTTING_DOWN would leave the
        node with a bare reset. A node reads the error when it sends its next request
        and then closes; frames it sends meanwhile are dropped. Bounded by the drain
        deadline.
        """
        with trio.move_on_at(self._drain_deadline):
            with contextlib.suppress(Exception):
                while await stream.read(4096):
                    pass

    @contextlib.contextmanager
    def _idle(self) -> Iterator[trio.CancelScope]:
        # While a session waits for its next request, shutdown may cancel the wait.
        with trio.CancelScope() as scope:
            self._idle_scopes.add(scope)
            try:
                yield scope
            finally:
                self._idle_scopes.discard(scope)

    async def _round(self, stream: INetStream, session: Session, frame: pb.Frame) -> bool:
        """Answer one verify frame; False when the stream broke."""
        received = trio.current_time()
        envelope = frame_envelope_bytes(frame)
        seq = 0
        try:
            _, req = open_request(envelope, expected_peer=session.peer)
            seq = req.seq
            first = len(session.state.tokens)  # where this round's first token will sit
            validate_verify_request(
                req, self.config.vocab_size, self.config.max_tree_tokens, session.last_seq,
                session_id=session.id, tokens_left=session.tokens_left,
            )
            outcome = await self._with_heartbeat(
                stream, session, seq, self._verify(session, list(req.tokens), list(req.parents)))
        except ProtocolError as exc:
            return await self._send_error(stream, exc, session.id, seq)
        verdict = outcome.verdict
        session.last_seq = req.seq
        session.generated += len(verdict.new_tokens)
        receipt = make_receipt(
            self.key_pair, verifier_peer=self.peer_id, node_peer=session.peer, request=req,
            request_envelope=envelope, accepted=len(verdict.accepted),
            verify_seconds=outcome.seconds, model_id=self.config.model_id,
            facts=verdict.facts, session_sha256=session.digest, engine=self.engine_name,
            first_position=first,
        )
        # Committed whether or not the node hears back: the ledger records the work. And
        # durable before the node hears back: a receipt the node holds must survive this
        # process being killed right after the answer (see verifier.receipts).
        await self.writer.durable(self.writer.submit(receipt, envelope))
        self.metrics.record_verdict(len(req.tokens), verdict.accepted)
        self._gauges()
        result = pb.VerifyResult(session_id=session.id, seq=req.seq, accepted=verdict.accepted,
                                 bonus_token=verdict.bonus, receipt=receipt)
        if not await self._write(stream, session, pb.Frame(result=result)):
            return False
        self._inter_token(session, len(verdict.new_tokens))
        self.metrics.verify_latency.observe(trio.current_time() - received)
        return True

    def _inter_token(self, session: Session, tokens: int) -> None:
        """Time between a session's answers per token: the latency its user sees."""
        now = trio.current_time()
        if session.answered_at is not None:
            label = standing_class(self.standings.earned(session.peer))
            self.metrics.itl.labels(standing=label).observe(
                (now - session.answered_at) / max(tokens, 1))
        session.answered_at = now

    async def _verify(self, session: Session, tokens: list[int], parents: list[int]) -> Outcome:
        """A request's verdict, once the session's prefill is done (a 1.1 node may send
        its first request while the prompt is still going through the model)."""
        await session.ready.wait()
        if session.prefill_error is not None:
            raise session.prefill_error
        return await self.scheduler.verify(session, tokens, parents)

    async def _with_heartbeat(self, stream: INetStream, session: Session, seq: int,
                              work: Awaitable[Outcome]) -> Outcome:
        """Await `work`, telling a 1.1 node every HEARTBEAT_INTERVAL that it is under way.

        This is what lets a node tell a busy verifier from a dead one without a deadline
        on queued work (see protocol.limits). A heartbeat that cannot be written (the
        node is gone) is dropped; the stream's reader notices the rest.
        """
        if not session.progress:
            return await work
        result: list[Outcome] = []
        failure: list[ProtocolError] = []

        async def run() -> None:
            try:
                result.append(await work)
            except ProtocolError as exc:
                failure.append(exc)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            if not session.ready.is_set():  # say at once where the prefill stands
                await self._write(stream, session, self._progress(session, seq))
            while True:
                await trio.sleep(HEARTBEAT_INTERVAL)
                await self._write(stream, session, self._progress(session, seq))
        if failure:
            raise failure[0]
        return result[0]

    def _progress(self, session: Session, seq: int) -> pb.Frame:
        state = session.state
        status = self.scheduler.status(session)
        if not session.ready.is_set():  # still prefilling: that is what the node waits for
            kind = "prefilling" if status.state == "prefilling" else "queued"
        else:
            kind = status.state if status.state != "idle" else "verifying"
        return pb.Frame(progress=pb.Progress(
            session_id=session.id, seq=seq, state=_PROGRESS_STATES[kind],
            queue_position=min(status.position, MAX_QUEUE_DEPTH),
            done=min(state.cached, state.prefix_len), total=state.prefix_len,
            eta_ms=min(int(status.eta_s * 1000), MAX_ETA_MS)))

    async def _write(self, stream: INetStream, session: Session, frame: pb.Frame) -> bool:
        """Write one frame of a session (never interleaved, never cut in half by a
        cancellation); False when the stream is broken."""
        with trio.CancelScope(shield=True):
            async with session.write_lock:
                try:
                    await write_frame(stream, frame)
                except ProtocolError:
                    return False
        return True

    async def _send_error(self, stream: INetStream, exc: ProtocolError,
                          session_id: bytes = b"", seq: int = 0) -> bool:
        """Send an Error frame; False when the stream is already broken."""
        self.metrics.errors.labels(code=exc.code.name).inc()
        log.debug("error to peer: %s", exc)
        session = self.table.sessions.get(session_id) if session_id else None
        if session is not None:
            return await self._write(stream, session, error_frame(exc, session_id, seq))
        try:
            await write_frame(stream, error_frame(exc, session_id, seq))
        except ProtocolError:
            return False
        return True

    # -- the advert protocol ------------------------------------------------------

    def advertisement(self, peer: str | None = None,
                      want_standing: bool = False) -> pb.Advertisement:
        """This verifier's live figures, as peers see them; with `want_standing`, also
        `peer`'s standing here and a statement of it signed by this verifier."""
        advert = self._figures()
        advert.standing_issuers.extend(self.config.accept_standing_from)
        if want_standing and peer is not None:
            value = self.standings.earned(peer)
            advert.your_standing = min(value, MAX_STANDING)
            statement = pb.StandingStatement(
                issuer_peer_id=self.peer_id, node_peer_id=peer,
                earned=min(max(value - GRANT, 0.0), MAX_STANDING),
                as_of_unix_ms=int(time.time() * 1000), half_life_s=HALF_LIFE_S)
            advert.standing_statement = seal_statement(self.key_pair, statement)
        return advert

    def _figures(self) -> pb.Advertisement:
        return pb.Advertisement(
            model_id=self.config.model_id,
            revision=self.config.revision,
            max_batch_tokens=self.config.max_batch_tokens,
            free_slots=0 if self.stopping else min(self.table.free_slots, MAX_FREE_SLOTS),
            queue_depth=min(self.scheduler.queue_depth + self.scheduler.running,
                            MAX_QUEUE_DEPTH),
            mean_verify_micros=min(int(self.scheduler.mean_verify_seconds * 1e6),
                                   MAX_VERIFY_MICROS),
            protocol_version=PROTOCOL_VERSION,
            max_tree_tokens=self.config.max_tree_tokens,
            vocab_size=self.config.vocab_size,
            prefill_tokens_per_s=self.scheduler.prefill_rows_per_s,
            mean_pass_micros=min(int(self.scheduler.mean_pass_seconds * 1e6), MAX_VERIFY_MICROS),
            sessions_open=min(len(self.table), MAX_SESSIONS),
            max_sessions=min(self.config.max_sessions, MAX_SESSIONS),
            queued_prefill_tokens=min(self.scheduler.queued_prefill_rows(), MAX_QUEUE_DEPTH),
            engine=self.engine_name,
            pass_costs=self._pass_costs(),
            committed_tokens=self.metrics.committed_total,
        )

    async def _advert_handler(self, stream: INetStream) -> None:
        with self._handler():
            try:
                with self._unopened_slot(str(stream.muxed_conn.peer_id)):
                    frame = await read_frame(stream, max_size=FRAME_LIMITS["advert_query"],
                                             timeout=ADVERT_TIMEOUT)
                expect(frame, "advert_query")
                validate_advert_query(frame.advert_query)
                query = frame.advert_query
                if query.model_id and query.model_id != self.config.model_id:
                    raise ProtocolError(ErrorCode.UNSUPPORTED_MODEL,
                                        f"this verifier serves {self.config.model_id!r}")
                advert = self.advertisement(str(stream.muxed_conn.peer_id), query.want_standing)
                await write_frame(stream, pb.Frame(advert=advert))
            except ProtocolError as exc:
                if exc.code != ErrorCode.STREAM_CLOSED:
                    await self._send_error(stream, exc)
            except Exception:
                log.exception("advert stream failed")
            finally:
                await _close(stream)

    async def _audit_handler(self, stream: INetStream) -> None:
        # Contained like every handler; the work is in verifier.audit.
        with self._handler():
            try:
                with self._unopened_slot(str(stream.muxed_conn.peer_id)):
                    await serve_audit(self, stream)
            except ProtocolError as exc:
                if exc.code != ErrorCode.STREAM_CLOSED:
                    await self._send_error(stream, exc)
            except Exception:
                log.exception("audit stream failed")
            finally:
                await _close(stream)

    def _gauges(self) -> None:
        self.metrics.sessions_open.set(len(self.table))
        self.metrics.kv_cache_bytes.set(self.table.kv_bytes())
        store = getattr(self.engine, "store", None)
        if store is not None:
            self.metrics.record_store(store)


async def _close(stream: INetStream) -> None:
    """Close a stream, bounded: a peer that stopped reading must not hold us, and the
    bytes it sent that we never read are released (see `hosts.close_stream`)."""
    await hosts.close_stream(stream, CLOSE_TIMEOUT)
