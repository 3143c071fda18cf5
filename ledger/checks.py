"""Checks on a (receipt, request) pair that need no database.

Both ingest and `verify` go through `check_pair`, so what the ledger accepts and what it
later re-checks are the same rule. Everything here is pure and thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from specedge.protocol import limits
from specedge.protocol.envelopes import open_receipt, open_request, request_digest
from specedge.protocol.errors import ProtocolError


class LedgerError(Exception):
    """Base class of the ledger's own errors."""


class ReceiptRejected(LedgerError):
    """A receipt the ledger refuses; nothing was written.

    `code` is a short stable word (bad_signature, wrong_peer, digest_mismatch, ...), the
    message says what exactly did not fit.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")

    def __reduce__(self):  # type: ignore[no-untyped-def]  # picklable across processes
        return (type(self), (self.code, self.message))


@dataclass(frozen=True, slots=True)
class CheckedReceipt:
    """A receipt whose two signatures and cross-references have been checked."""

    verifier: str
    verifier_key: bytes
    node: str
    node_key: bytes
    session_id: bytes
    seq: int
    request_sha256: bytes
    drafted: int
    accepted: int
    verify_micros: int
    draft_micros: int
    unix_ms: int
    model_id: str
    receipt_envelope: bytes
    request_envelope: bytes

    @property
    def key(self) -> tuple[str, bytes, int]:
        """What idempotency is on: (verifier, session, seq)."""
        return (self.verifier, self.session_id, self.seq)


_PROTOCOL_CODES = {
    "BAD_SIGNATURE": "bad_signature",
    "BAD_KEY": "bad_key",
    "WRONG_PEER": "wrong_peer",
    "WRONG_PAYLOAD_TYPE": "wrong_payload_type",
    "TOO_LARGE": "too_large",
}


def _rejected(exc: ProtocolError, what: str) -> ReceiptRejected:
    code = _PROTOCOL_CODES.get(exc.code.name, "malformed")
    return ReceiptRejected(code, f"{what}: {exc.message}")


def check_pair(receipt_envelope: bytes, request_envelope: bytes) -> CheckedReceipt:
    """Check a verifier's signed receipt against the node's signed request.

    Raises ReceiptRejected unless: both envelopes carry valid signatures; the receipt's
    verifier_peer_id is its signer; the request's signer is the receipt's node_peer_id;
    the receipt's request_sha256 is the sha256 of the exact request envelope; session id,
    seq and draft time agree; drafted is the request's tree size and accepted <= drafted.
    """
    receipt_envelope = bytes(receipt_envelope)
    request_envelope = bytes(request_envelope)
    try:
        r_open, r = open_receipt(receipt_envelope)
    except ProtocolError as exc:
        raise _rejected(exc, "receipt") from None
    if not r.node_peer_id or len(r.node_peer_id) > limits.MAX_PEER_ID_CHARS:
        raise ReceiptRejected("malformed", "receipt has no valid node_peer_id")
    try:
        q_open, q = open_request(request_envelope, expected_peer=r.node_peer_id)
    except ProtocolError as exc:
        raise _rejected(exc, "request") from None
    if r.node_peer_id == r_open.peer_id:
        # A verifier crediting itself for its own drafts would mint credit for free.
        raise ReceiptRejected("self_receipt", "the verifier and the node are the same peer")
    if request_digest(request_envelope) != r.request_sha256:
        raise ReceiptRejected(
            "digest_mismatch", "receipt's request_sha256 is not the sha256 of this request"
        )
    if q.session_id != r.session_id:
        raise ReceiptRejected("session_mismatch", "receipt and request name different sessions")
    if q.seq != r.seq:
        raise ReceiptRejected("seq_mismatch", f"receipt seq {r.seq} != request seq {q.seq}")
    if len(r.session_id) != limits.SESSION_ID_BYTES:
        raise ReceiptRejected("malformed", f"session id of {len(r.session_id)} bytes")
    if not 1 <= r.seq < 1 << 63:
        raise ReceiptRejected("malformed", "seq out of range (1 .. 2**63-1)")
    if r.drafted != len(q.tokens):
        raise ReceiptRejected(
            "count_mismatch", f"receipt says {r.drafted} drafted, request has {len(q.tokens)}"
        )
    if r.accepted > r.drafted:
        raise ReceiptRejected("count_mismatch", f"accepted {r.accepted} > drafted {r.drafted}")
    if r.draft_micros != q.draft_micros:
        raise ReceiptRejected("draft_time_mismatch", "receipt's draft_micros is not the request's")
    if r.verify_micros > limits.MAX_VERIFY_MICROS or r.draft_micros > limits.MAX_DRAFT_MICROS:
        raise ReceiptRejected("malformed", "compute time out of range")
    if not r.model_id or len(r.model_id) > limits.MAX_MODEL_ID_CHARS:
        raise ReceiptRejected("malformed", "receipt has no valid model_id")
    if r.unix_ms >= 1 << 63:
        raise ReceiptRejected("malformed", "unix_ms out of range")
    return CheckedReceipt(
        verifier=r_open.peer_id,
        verifier_key=r_open.public_key,
        node=q_open.peer_id,
        node_key=q_open.public_key,
        session_id=r.session_id,
        seq=r.seq,
        request_sha256=r.request_sha256,
        drafted=r.drafted,
        accepted=r.accepted,
        verify_micros=r.verify_micros,
        draft_micros=r.draft_micros,
        unix_ms=r.unix_ms,
        model_id=r.model_id,
        receipt_envelope=receipt_envelope,
        request_envelope=request_envelope,
    )
