"""Receipts: signed by the verifier, sent to the node, written to the ledger.

A receipt names the node's signed request by the digest of its exact envelope bytes,
so the ledger row (receipt + request) proves both who asked and who answered.

The ledger is written off the event loop by a few worker tasks, each calling the
(blocking) ledger in a thread: `SpoolingLedger` keeps receipts on local disk while the
database is down, and `Ledger.store_one` commits receipts that arrive together in one
transaction, so several workers share fsyncs. On shutdown the queue is closed and the
workers drain it before the process exits.

Durable before answered: `submit` returns an event set once the receipt is stored (or
spooled, or refused), and the verifier waits for it (up to RECEIPT_WAIT) before it sends
the result. Otherwise a verifier killed (SIGKILL, a crash, a power cut) between sending
a result and its ledger commit loses a receipt the node holds: the fault tests saw it
on the first try.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Protocol

import trio
from libp2p.crypto.keys import KeyPair

from specedge.audit import Facts
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import request_digest, seal_receipt
from specedge.protocol.limits import MAX_VERIFY_MICROS
from specedge.verifier.metrics import VerifierMetrics

log = logging.getLogger("specedge.verifier.receipts")

WORKERS = 4
# How long a result waits for its receipt to be durable. Past it (a database hanging
# rather than refusing) the node is answered anyway; the receipt stays queued.
RECEIPT_WAIT = 2.0


def make_receipt(
    key_pair: KeyPair,
    *,
    verifier_peer: str,
    node_peer: str,
    request: pb.VerifyRequest,
    request_envelope: bytes,
    accepted: int,
    verify_seconds: float,
    model_id: str,
    facts: Sequence[Facts] = (),
    session_sha256: bytes = b"",
    engine: str = "",
    first_position: int = 0,
) -> bytes:
    """The sealed Receipt envelope for one answered request.

    verify_seconds: the request's share of its pass's compute time (passes are split
    among their jobs in proportion to the rows each forwarded).
    """
    receipt = pb.Receipt(
        verifier_peer_id=verifier_peer,
        node_peer_id=node_peer,
        session_id=request.session_id,
        seq=request.seq,
        request_sha256=request_digest(request_envelope),
        drafted=len(request.tokens),
        accepted=accepted,
        verify_micros=min(max(round(verify_seconds * 1e6), 0), MAX_VERIFY_MICROS),
        unix_ms=int(time.time() * 1000),
        model_id=model_id,
        draft_micros=request.draft_micros,
        positions=[position_message(f) for f in facts],
        session_sha256=session_sha256,
        engine=engine,
        first_position=first_position,
    )
    return seal_receipt(key_pair, receipt)


def position_message(f: Facts) -> pb.AuditPosition:
    """One committed position's facts as a receipt (or audit answer) carries them."""
    return pb.AuditPosition(token=f.token, logprob=f.logprob, margin=f.margin,
                            deficit=f.deficit, top_tokens=f.top_tokens,
                            top_logprobs=f.top_logprobs)


class Ingest(Protocol):
    def ingest(self, receipt_envelope: bytes, request_envelope: bytes) -> object: ...


class ReceiptWriter:
    """Queue of (receipt, request) pairs on their way to the ledger."""

    def __init__(self, ledger: Ingest | None, metrics: VerifierMetrics | None = None) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self._send, self._receive = trio.open_memory_channel[tuple[bytes, bytes, trio.Event]](
            math.inf)
        self.pending = 0

    def submit(self, receipt_envelope: bytes, request_envelope: bytes) -> trio.Event:
        """Hand a pair over; never blocks the caller. The event is set once the pair is
        written (stored, spooled or refused)."""
        written = trio.Event()
        if self.ledger is None:
            written.set()
            return written
        try:
            self._send.send_nowait((receipt_envelope, request_envelope, written))
            self.pending += 1
        except trio.ClosedResourceError:  # after shutdown began: write it now, inline
            self._write(receipt_envelope, request_envelope)
            written.set()
        return written

    async def durable(self, written: trio.Event, timeout: float = RECEIPT_WAIT) -> bool:
        """Wait (bounded) until a submitted pair is written; False if it is not yet."""
        with trio.move_on_after(timeout):
            await written.wait()
        if not written.is_set():
            log.warning("receipt not written within %g s; answering anyway", timeout)
        return written.is_set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write until `close()` and the queue is empty."""
        async with trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(self._worker, self._receive.clone())
            await self._receive.aclose()
            task_status.started()

    def close(self) -> None:
        """No more receipts; `run` returns once the queued ones are written."""
        self._send.close()

    async def _worker(
            self, receive: trio.MemoryReceiveChannel[tuple[bytes, bytes, trio.Event]]) -> None:
        async with receive:
            async for receipt_env, request_env, written in receive:
                # Shielded: a receipt taken off the queue is written even during shutdown.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._write, receipt_env, request_env)
                self.pending -= 1
                written.set()

    def _write(self, receipt_env: bytes, request_env: bytes) -> None:
        assert self.ledger is not None
        try:
            result = self.ledger.ingest(receipt_env, request_env)
            status = getattr(result, "status", "stored")
        except Exception as exc:  # ReceiptRejected or a database error the spool missed
            log.error("ledger refused a receipt: %s", exc)
            status = "failed"
        if self.metrics is not None:
            self.metrics.receipts.labels(status=status).inc()
