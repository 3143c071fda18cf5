"""SQLAlchemy models of the ledger.

The tables are created and changed only by the Alembic migrations in `migrations/`;
these models are what the code reads and writes, and a test checks that the migrated
schema and these models agree.

What is evidence and what is derived:

- `receipts.receipt_envelope` and `receipts.request_envelope` are the exact signed bytes
  (the verifier's receipt and the node's request). Every other receipt column is a copy
  of a signed field, kept for queries; `verify` re-parses the envelopes and compares.
- `prev_hash`/`row_hash`/`chain_index`/`ingested_ms` form the per-verifier hash chain;
  `chain_heads` holds each chain's length and last hash, so a dropped tail row is seen.
- `credit_entries` are double-entry rows derived from the receipt by a fixed rule, so
  `verify` can recompute them exactly.
- `prices` and `baselines` are configuration and benchmark input, not evidence.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Fixed constraint names so migrations and models compare equal on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

PEER_ID_LEN = 128
MODEL_ID_LEN = 256


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Peer(Base):
    """A verifier or node, known by the key that signed one of its envelopes."""

    __tablename__ = "peers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_id: Mapped[str] = mapped_column(String(PEER_ID_LEN), unique=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)


class Session(Base):
    """One generation session on one verifier; session ids are unique per verifier."""

    __tablename__ = "sessions"
    __table_args__ = (UniqueConstraint("verifier_pk", "session_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    verifier_pk: Mapped[int] = mapped_column(ForeignKey("peers.id"))
    node_pk: Mapped[int] = mapped_column(ForeignKey("peers.id"), index=True)
    session_id: Mapped[bytes] = mapped_column(LargeBinary)
    model_id: Mapped[str] = mapped_column(String(MODEL_ID_LEN))


class Receipt(Base):
    """One verification round: the verifier's signed receipt and the node's signed request."""

    __tablename__ = "receipts"
    __table_args__ = (
        # Idempotency: (verifier, session, seq) counts once; session_pk implies verifier.
        UniqueConstraint("session_pk", "seq"),
        # The chain is linear: one row per position per verifier.
        UniqueConstraint("verifier_pk", "chain_index"),
        Index("ix_receipts_node_pk", "node_pk"),
        Index("ix_receipts_unix_ms", "unix_ms"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    verifier_pk: Mapped[int] = mapped_column(ForeignKey("peers.id"))
    node_pk: Mapped[int] = mapped_column(ForeignKey("peers.id"))
    session_pk: Mapped[int] = mapped_column(ForeignKey("sessions.id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    request_sha256: Mapped[bytes] = mapped_column(LargeBinary)
    drafted: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[int] = mapped_column(Integer)
    verify_micros: Mapped[int] = mapped_column(BigInteger)
    draft_micros: Mapped[int] = mapped_column(BigInteger)
    unix_ms: Mapped[int] = mapped_column(BigInteger)
    model_id: Mapped[str] = mapped_column(String(MODEL_ID_LEN))
    receipt_envelope: Mapped[bytes] = mapped_column(LargeBinary)
    request_envelope: Mapped[bytes] = mapped_column(LargeBinary)
    chain_index: Mapped[int] = mapped_column(BigInteger)
    ingested_ms: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary)
    row_hash: Mapped[bytes] = mapped_column(LargeBinary)


class ChainHead(Base):
    """Length and last hash of one verifier's chain; its row is the writers' lock."""

    __tablename__ = "chain_heads"

    verifier_pk: Mapped[int] = mapped_column(ForeignKey("peers.id"), primary_key=True)
    length: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[bytes] = mapped_column(LargeBinary)


class CreditEntry(Base):
    """One leg of a double-entry credit transaction; a receipt's legs sum to zero."""

    __tablename__ = "credit_entries"
    __table_args__ = (
        Index("ix_credit_entries_account", "account"),
        Index("ix_credit_entries_receipt_pk", "receipt_pk"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    receipt_pk: Mapped[int] = mapped_column(ForeignKey("receipts.id"))
    # A peer id, or NETWORK_ACCOUNT for the issuing side.
    account: Mapped[str] = mapped_column(String(PEER_ID_LEN))
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)


class Price(Base):
    """US dollars per hour for one kind of hardware ('server' or 'edge')."""

    __tablename__ = "prices"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    hardware: Mapped[str] = mapped_column(String(128))
    usd_per_hour: Mapped[float] = mapped_column(Float)
    updated_ms: Mapped[int] = mapped_column(BigInteger)


class Baseline(Base):
    """Timings a benchmark measured for a serving mode the ledger has no receipts for."""

    __tablename__ = "baselines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mode: Mapped[str] = mapped_column(String(32))
    label: Mapped[str] = mapped_column(String(256))
    tokens: Mapped[int] = mapped_column(BigInteger)
    server_seconds: Mapped[float] = mapped_column(Float)
    edge_seconds: Mapped[float] = mapped_column(Float)
    recorded_ms: Mapped[int] = mapped_column(BigInteger)


class FraudProofRow(Base):
    """A fraud proof (protocol.audits.check_proof), stored whole; the other columns are
    what it proves, kept for queries and re-derived by `verify`."""

    __tablename__ = "fraud_proofs"
    __table_args__ = (Index("ix_fraud_proofs_accused", "accused"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    proof_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    accused: Mapped[str] = mapped_column(String(PEER_ID_LEN))
    node: Mapped[str] = mapped_column(String(PEER_ID_LEN))
    model_id: Mapped[str] = mapped_column(String(MODEL_ID_LEN))
    position: Mapped[int] = mapped_column(Integer)
    auditors: Mapped[str] = mapped_column(String(1024))  # comma-separated peer ids
    proof: Mapped[bytes] = mapped_column(LargeBinary)
    stored_ms: Mapped[int] = mapped_column(BigInteger)


class AuditRecord(Base):
    """One audit of a verifier's session that came back clean (near-ties excused):
    what releases the verifier's pending credit."""

    __tablename__ = "audit_records"
    __table_args__ = (Index("ix_audit_records_verifier", "verifier"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    verifier: Mapped[str] = mapped_column(String(PEER_ID_LEN))
    auditor: Mapped[str] = mapped_column(String(PEER_ID_LEN))
    session_id: Mapped[bytes] = mapped_column(LargeBinary)
    tokens: Mapped[int] = mapped_column(Integer)
    near_ties: Mapped[int] = mapped_column(Integer)
    recorded_ms: Mapped[int] = mapped_column(BigInteger)


peers = Peer.__table__
sessions = Session.__table__
receipts = Receipt.__table__
chain_heads = ChainHead.__table__
credit_entries = CreditEntry.__table__
prices = Price.__table__
baselines = Baseline.__table__
fraud_proofs = FraudProofRow.__table__
audit_records = AuditRecord.__table__

# Tables whose every row is evidence that `verify` checks (prices/baselines are settings).
EVIDENCE_TABLES = (peers, sessions, receipts, chain_heads, credit_entries)
