"""Fraud proofs and audit records in the ledger, and what they do to a verifier's credit.

A proof is stored only if it checks (`protocol.audits.check_proof`: every signature, the
transcript, two independent auditors beyond the tolerance), once per distinct proof.
A verifier's verification credit is *pending* until the ledger holds `CLEAR_AFTER` clean
audits of its sessions, and *forfeited* once it holds a proof against it: credit is
what honest work earned, and nobody can tell honest work from unaudited work sooner.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine

from specedge.ledger.schema import audit_records, fraud_proofs
from specedge.protocol.audits import FraudProofError, ProvenFraud, check_proof

CLEAR_AFTER = 5  # clean audits before a verifier's credit stops being pending


@dataclass(frozen=True)
class StoredProof:
    proof_sha256: str
    accused: str
    node: str
    model_id: str
    position: int
    auditors: list[str]
    stored_ms: int
    new: bool = True


def store_proof(engine: Engine, data: bytes) -> StoredProof:
    """Check and keep a fraud proof (FraudProofError if it proves nothing)."""
    found: ProvenFraud = check_proof(data)
    digest = hashlib.sha256(data).hexdigest()
    row = {"proof_sha256": digest, "accused": found.accused, "node": found.node,
           "model_id": found.model_id, "position": found.position,
           "auditors": ",".join(found.auditors), "proof": bytes(data),
           "stored_ms": int(time.time() * 1000)}
    with engine.begin() as conn:
        have = conn.execute(select(fraud_proofs.c.stored_ms).where(
            fraud_proofs.c.proof_sha256 == digest)).first()
        if have is None:
            conn.execute(insert(fraud_proofs).values(**row))
    stored = row["stored_ms"] if have is None else int(have[0])
    return StoredProof(digest, found.accused, found.node, found.model_id, found.position,
                       found.auditors, int(stored), have is None)


def record_audit(engine: Engine, verifier: str, auditor: str, session_id: bytes,
                 tokens: int, near_ties: int) -> None:
    """Note a clean audit of one of `verifier`'s sessions."""
    with engine.begin() as conn:
        conn.execute(insert(audit_records).values(
            verifier=verifier, auditor=auditor, session_id=session_id, tokens=tokens,
            near_ties=near_ties, recorded_ms=int(time.time() * 1000)))


def list_proofs(engine: Engine) -> list[StoredProof]:
    q = select(fraud_proofs).order_by(fraud_proofs.c.id)
    with engine.connect() as conn:
        return [StoredProof(r.proof_sha256, r.accused, r.node, r.model_id, r.position,
                            r.auditors.split(",") if r.auditors else [], r.stored_ms, False)
                for r in conn.execute(q)]


def clean_audits(engine: Engine, verifier: str) -> int:
    q = select(func.count()).where(audit_records.c.verifier == verifier)
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def credit_state(engine: Engine, verifier: str) -> str:
    """'forfeited' (a proof holds), 'pending' (not yet audited clean enough) or 'cleared'."""
    with engine.connect() as conn:
        proven = conn.execute(select(func.count()).where(
            fraud_proofs.c.accused == verifier)).scalar_one()
    if proven:
        return "forfeited"
    return "cleared" if clean_audits(engine, verifier) >= CLEAR_AFTER else "pending"


def verify_proofs(engine: Engine) -> list[tuple[int, str]]:
    """(row id, what is wrong) for every stored proof that no longer checks or whose
    columns disagree with what it proves."""
    bad: list[tuple[int, str]] = []
    with engine.connect() as conn:
        for r in conn.execute(select(fraud_proofs).order_by(fraud_proofs.c.id)):
            data = bytes(r.proof)
            try:
                found = check_proof(data)
            except FraudProofError as exc:
                bad.append((r.id, str(exc)))
                continue
            if (hashlib.sha256(data).hexdigest() != r.proof_sha256
                    or found.accused != r.accused or found.position != r.position
                    or found.node != r.node):
                bad.append((r.id, "columns differ from what the proof proves"))
    return bad
