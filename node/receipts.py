"""The node's receipts: checked on arrival, kept in the node's own ledger file.

A receipt is the node's proof of credit: the verifier signed that it accepted so many of
this node's draft tokens. It is worth something only if it names the request the node
really sent (sha256 of the exact envelope bytes) and carries a valid verifier signature,
so both are checked before the round's tokens are used; a verifier that returns a bad
receipt is treated like one that failed. Storage goes through `specedge.ledger`, the same
checks and schema the verifiers' ledgers use, so anyone can audit the node's file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:  # the ledger pulls in SQLAlchemy: imported when first used
    from specedge.ledger import Ledger

from specedge.audit import Facts, ReceiptContradiction, check_round
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import open_receipt
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.limits import MAX_TOP_LOGPROBS
from specedge.protocol.validation import validate_receipt
from specedge.sampling import SamplingParams

log = logging.getLogger("specedge.node.receipts")

LEDGER_NAME = "node"  # default file: <user data dir>/specedge/node.sqlite3


@dataclass(frozen=True)
class KeptReceipt:
    """A checked receipt with the request it answers (both exact envelope bytes)."""

    verifier: str
    session_id: bytes
    seq: int
    drafted: int
    accepted: int
    verify_micros: int
    receipt_envelope: bytes
    request_envelope: bytes
    facts: tuple[Facts, ...] = ()  # the target's word on each committed position
    engine: str = ""

    def summary(self) -> dict[str, object]:
        return {"verifier": self.verifier, "session_id": self.session_id.hex(), "seq": self.seq,
                "drafted": self.drafted, "accepted": self.accepted,
                "verify_micros": self.verify_micros}


@dataclass(frozen=True)
class RoundContext:
    """What the node knows about a round that the receipt must agree with."""

    session_digest: bytes  # protocol.audits.session_digest of the session
    first_position: int  # absolute index the round's first committed token takes
    params: SamplingParams
    top_logprobs: int  # alternatives asked for at each position
    vocab_size: int


def check_receipt(receipt_envelope: bytes, request_envelope: bytes, request: pb.VerifyRequest,
                  result: pb.VerifyResult, *, node: str, verifier: str,
                  model_id: str, context: RoundContext | None = None) -> KeptReceipt:
    """Check a receipt against what this node sent and received; raise ProtocolError.

    The verifier's signature (and that it signed as `verifier`, the peer on the stream),
    the digest of the exact request envelope we sent, our own peer id, the model, and the
    drafted/accepted counts against the request and the result. With `context` (protocol
    1.2), also the receipt's facts about every committed position: they must name this
    session and position, and the acceptance rule run on them with our own tree and seed
    must give the verdict we got (`specedge.audit.check_round`).
    """
    _, receipt = open_receipt(receipt_envelope, expected_peer=verifier)
    validate_receipt(receipt, request_envelope=request_envelope, request=request, result=result,
                     node_peer=node, verifier_peer=verifier, model_id=model_id)
    facts = check_facts(receipt, request, result, context) if context is not None else []
    return KeptReceipt(verifier, bytes(receipt.session_id), int(receipt.seq),
                       int(receipt.drafted), int(receipt.accepted), int(receipt.verify_micros),
                       receipt_envelope, request_envelope, tuple(facts), receipt.engine)


def check_facts(receipt: pb.Receipt, request: pb.VerifyRequest, result: pb.VerifyResult,
                context: RoundContext) -> list[Facts]:
    """The receipt's positions, checked (BAD_RECEIPT when missing or contradictory)."""
    if not receipt.positions:
        raise ProtocolError(ErrorCode.BAD_RECEIPT, "receipt without positions: the verifier "
                            "speaks a protocol older than 1.2")
    if receipt.session_sha256 != context.session_digest:
        raise ProtocolError(ErrorCode.BAD_RECEIPT, "receipt names another prompt or sampling")
    if receipt.first_position != context.first_position:
        raise ProtocolError(ErrorCode.BAD_RECEIPT, "receipt names another position")
    if not receipt.engine:
        raise ProtocolError(ErrorCode.BAD_RECEIPT, "receipt names no engine")
    facts = [Facts(int(p.token), float(p.logprob), float(p.margin), 0.0,
                   [int(t) for t in p.top_tokens][:MAX_TOP_LOGPROBS],
                   [float(x) for x in p.top_logprobs][:MAX_TOP_LOGPROBS])
             for p in receipt.positions]
    try:
        check_round(list(request.tokens), list(request.parents), list(result.accepted),
                    int(result.bonus_token), facts, context.params, context.first_position,
                    context.top_logprobs, context.vocab_size)
    except ReceiptContradiction as exc:
        raise ProtocolError(ErrorCode.BAD_RECEIPT, f"receipt contradicts itself: {exc}") from None
    return facts


@dataclass
class Tally:
    """Running totals for the status display (this process only; the ledger has all)."""

    receipts: int = 0
    accepted: int = 0
    drafted: int = 0
    stored: int = 0
    failed: int = 0
    credit: int = 0  # the node's balance in its ledger, refreshed after each write
    last_error: str = ""
    by_verifier: dict[str, int] = field(default_factory=dict)


class ReceiptBook:
    """Hands receipts to a writer task so a ledger fsync never delays a round.

    Build it with `receipt_book(...)`; `keep` may be called from any task.
    """

    def __init__(self, ledger: Ledger | None, node: str, send: trio.MemorySendChannel) -> None:
        self.ledger = ledger  # None: count receipts, keep nothing
        self.node = node
        self._send = send
        self.tally = Tally()

    def keep(self, kept: KeptReceipt) -> None:
        """Count a checked receipt and queue it for the writer (never blocks)."""
        t = self.tally
        t.receipts += 1
        t.accepted += kept.accepted
        t.drafted += kept.drafted
        t.by_verifier[kept.verifier] = t.by_verifier.get(kept.verifier, 0) + 1
        if self.ledger is not None:
            self._send.send_nowait(kept)  # unbounded: a slow disk delays nothing

    def _store(self, kept: KeptReceipt) -> None:
        try:
            self.ledger.ingest(kept.receipt_envelope, kept.request_envelope)
            self.tally.stored += 1
            self.tally.credit = self.ledger.balance(self.node).balance
        except Exception as exc:  # a full disk must not stop generation; say so
            self.tally.failed += 1
            self.tally.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("could not store receipt %s/%d: %s", kept.verifier, kept.seq, exc)

    async def _drain(self, recv: trio.MemoryReceiveChannel) -> None:
        try:
            async for kept in recv:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._store, kept)
        finally:
            # Cancelled (Ctrl-C): still write what already arrived; each is milliseconds.
            with trio.CancelScope(shield=True):
                while True:
                    try:
                        kept = recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
                    await trio.to_thread.run_sync(self._store, kept)


def open_node_ledger(path: str | Path | None) -> Ledger:
    """The node's ledger: `path` (file or URL), else `<data dir>/specedge/node.sqlite3`.

    Not $SPECEDGE_LEDGER: that names a verifier's ledger, and a node's own receipts
    must not land in a ledger it does not control.
    """
    from specedge.ledger import default_ledger_path, open_ledger

    if path is None:
        path = default_ledger_path(LEDGER_NAME)
        path.parent.mkdir(parents=True, exist_ok=True)
    return open_ledger(str(path))


@asynccontextmanager
async def receipt_book(path: str | Path | None, node: str,
                       enabled: bool = True) -> AsyncIterator[ReceiptBook]:
    """A ReceiptBook whose writer runs for the duration of the `async with` block."""
    ledger = await trio.to_thread.run_sync(open_node_ledger, path) if enabled else None
    send, recv = trio.open_memory_channel(math.inf)
    book = ReceiptBook(ledger, node, send)
    try:
        if ledger is not None:
            book.tally.credit = await trio.to_thread.run_sync(
                lambda: ledger.balance(node).balance)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(book._drain, recv)
            try:
                yield book
            finally:
                send.close()
    finally:
        if ledger is not None:
            ledger.close()
