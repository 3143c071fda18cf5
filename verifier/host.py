"""The verifier daemon: libp2p streams in, batched verifications, signed receipts out.

Wire conversation (the node implements the other side exactly like this)
-----------------------------------------------------------------------
Verify protocol ``/specedge/verify/1.0.0`` (``protocol.ids.VERIFY_PROTOCOL``), one stream
per session, every record a length-prefixed ``Frame`` (``protocol.framing``):

1. node -> ``Frame(open=OpenSession)`` within ``HANDSHAKE_TIMEOUT``. The verifier checks it
   (``validate_open_session``: version, model id, revision when both name one, prompt,
   sampling, context), takes a session slot (OVERLOADED when the host or this peer has
   none left), prefills ``prompt[:-1]`` (chunked, between other sessions' rounds) and
   answers ``Frame(opened=SessionOpened)`` with a fresh 16-byte session id, its peer id,
   the vocabulary size and the largest tree it accepts. Any refusal is
   ``Frame(error=Error)`` and the stream is closed.
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

Discovery: the verifier provides ``dht_key(model_id)`` on the Kademlia DHT and
re-announces every ``REANNOUNCE_INTERVAL`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair

from specedge.protocol import hosts
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import frame_envelope_bytes, open_request
from specedge.protocol.errors import ErrorCode, ProtocolError, error_frame
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.identity import peer_id_of
from specedge.protocol.ids import ADVERT_PROTOCOL, PROTOCOL_VERSION, VERIFY_PROTOCOL, dht_key
from specedge.protocol.limits import (
    ADVERT_TIMEOUT,
    BATCH_WAIT,
    FRAME_LIMITS,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_FREE_SLOTS,
    MAX_QUEUE_DEPTH,
    MAX_VERIFY_MICROS,
)
from specedge.protocol.validation import (
    expect,
    validate_advert_query,
    validate_close_session,
    validate_open_session,
    validate_verify_request,
)
from specedge.sampling import SamplingParams
from specedge.verifier.engine import TargetEngine
from specedge.verifier.metrics import VerifierMetrics
from specedge.verifier.receipts import Ingest, ReceiptWriter, make_receipt
from specedge.verifier.scheduler import Scheduler
from specedge.verifier.sessions import Session, SessionTable, new_session_id

log = logging.getLogger("specedge.verifier")

CLOSE_TIMEOUT = 2.0  # seconds to close a stream politely before giving up on it


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
    max_sessions: int = 64
    max_sessions_per_peer: int = 16
    idle_timeout: float = IDLE_TIMEOUT
    drain_timeout: float = 10.0  # seconds shutdown waits for rounds in flight
    announce_file: str | None = None
    dht: bool = True
    reannounce_interval: float = hosts.REANNOUNCE_INTERVAL


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
        self.table = SessionTable(config.max_sessions, config.max_sessions_per_peer)
        self.scheduler = Scheduler(engine, config.max_batch_tokens, self.metrics,
                                   batch_wait=config.batch_wait)
        self.writer = ReceiptWriter(ledger, self.metrics)
        self.addrs: list[str] = []
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
                async with hosts.running_host(self.key_pair, self.config.listen) as host:
                    host.set_stream_handler(VERIFY_PROTOCOL, self._verify_handler)
                    host.set_stream_handler(ADVERT_PROTOCOL, self._advert_handler)
                    async with self._discovery(host):
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

    @contextlib.asynccontextmanager
    async def _discovery(self, host: IHost) -> AsyncIterator[None]:
        """The DHT and the periodic provider record, while serving."""
        if not self.config.dht:
            yield
            return
        async with hosts.running_dht(host, bootstrap=self.config.bootstrap) as dht:
            async with trio.open_nursery() as nursery:
                # Started after the first announcement, so "ready" (the announce file)
                # means "findable": a verifier restarted on a new address is otherwise
                # looked up at its old one by nodes that ask right away.
                await nursery.start(
                    lambda task_status: hosts.provide_forever(
                        dht, dht_key(self.config.model_id),
                        interval=self.config.reannounce_interval, task_status=task_status))
                yield
                nursery.cancel_scope.cancel()

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
        session = Session(
            new_session_id(), peer,
            self.engine.new_state(list(msg.prompt), _sampling(msg.sampling)),
            msg.max_new_tokens,
        )
        self.table.add(session)
        self.metrics.sessions_opened.inc()
        self._gauges()
        reason = "closed"
        try:
            reason = await self._run_session(stream, session)
        finally:
            self.table.remove(session)
            self.scheduler.forget(session)
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
                free_slots=self.table.free_slots,
            )
            _sampling(msg.sampling)
            self.table.reserve(peer)
        except ProtocolError as exc:
            if exc.code != ErrorCode.STREAM_CLOSED:
                await self._send_error(stream, exc)
            return None
        return msg

    async def _run_session(self, stream: INetStream, session: Session) -> str:
        """Prefill, answer SessionOpened, then rounds; return why the session ended."""
        try:
            await self.scheduler.prefill(session)
            self._gauges()
            await write_frame(stream, pb.Frame(opened=pb.SessionOpened(
                session_id=session.id, verifier_peer_id=self.peer_id,
                vocab_size=self.config.vocab_size, max_tree_tokens=self.config.max_tree_tokens,
            )))
        except ProtocolError as exc:
            await self._send_error(stream, exc)
            return exc.code.name.lower()
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
            validate_verify_request(
                req, self.config.vocab_size, self.config.max_tree_tokens, session.last_seq,
                session_id=session.id, tokens_left=session.tokens_left,
            )
            outcome = await self.scheduler.verify(session, list(req.tokens), list(req.parents))
        except ProtocolError as exc:
            return await self._send_error(stream, exc, session.id, seq)
        verdict = outcome.verdict
        session.last_seq = req.seq
        session.generated += len(verdict.new_tokens)
        receipt = make_receipt(
            self.key_pair, verifier_peer=self.peer_id, node_peer=session.peer, request=req,
            request_envelope=envelope, accepted=len(verdict.accepted),
            verify_seconds=outcome.seconds, model_id=self.config.model_id,
        )
        # Committed whether or not the node hears back: the ledger records the work. And
        # durable before the node hears back: a receipt the node holds must survive this
        # process being killed right after the answer (see verifier.receipts).
        await self.writer.durable(self.writer.submit(receipt, envelope))
        self.metrics.record_verdict(len(req.tokens), verdict.accepted)
        self._gauges()
        result = pb.VerifyResult(session_id=session.id, seq=req.seq, accepted=verdict.accepted,
                                 bonus_token=verdict.bonus, receipt=receipt)
        try:
            await write_frame(stream, pb.Frame(result=result))
        except ProtocolError:
            return False
        self.metrics.verify_latency.observe(trio.current_time() - received)
        return True

    async def _send_error(self, stream: INetStream, exc: ProtocolError,
                          session_id: bytes = b"", seq: int = 0) -> bool:
        """Send an Error frame; False when the stream is already broken."""
        self.metrics.errors.labels(code=exc.code.name).inc()
        log.debug("error to peer: %s", exc)
        try:
            await write_frame(stream, error_frame(exc, session_id, seq))
        except ProtocolError:
            return False
        return True

    # -- the advert protocol ------------------------------------------------------

    def advertisement(self) -> pb.Advertisement:
        """This verifier's live figures, as peers see them."""
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
            sessions_open=min(len(self.table), MAX_FREE_SLOTS),
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
                wanted = frame.advert_query.model_id
                if wanted and wanted != self.config.model_id:
                    raise ProtocolError(ErrorCode.UNSUPPORTED_MODEL,
                                        f"this verifier serves {self.config.model_id!r}")
                await write_frame(stream, pb.Frame(advert=self.advertisement()))
            except ProtocolError as exc:
                if exc.code != ErrorCode.STREAM_CLOSED:
                    await self._send_error(stream, exc)
            except Exception:
                log.exception("advert stream failed")
            finally:
                await _close(stream)

    def _gauges(self) -> None:
        self.metrics.sessions_open.set(len(self.table))
        self.metrics.kv_cache_bytes.set(self.table.kv_bytes())


def _sampling(msg: pb.Sampling) -> SamplingParams:
    """The session's sampling parameters (INVALID_PARAMETER if no sampler can honour them)."""
    params = SamplingParams(temperature=float(msg.temperature), top_p=float(msg.top_p or 1.0),
                            top_k=int(msg.top_k), seed=int(msg.seed))
    try:
        params.check()
    except ValueError as exc:
        raise ProtocolError(ErrorCode.INVALID_PARAMETER, str(exc)) from None
    return params


async def _close(stream: INetStream) -> None:
    """Close a stream, bounded: a peer that stopped reading must not hold us, and the
    bytes it sent that we never read are released (see `hosts.close_stream`)."""
    await hosts.close_stream(stream, CLOSE_TIMEOUT)
