"""Audits and fraud proofs: the rule that tells a cheating verifier from an honest one.

Token choice is a pure function of (seed, absolute position, target logits), so two
honest verifiers of the same target choose the same token at every position, except
where the two best candidates are so close that float rounding decides (a near-tie:
bf16 kernels of different shapes round differently). Each committed position therefore
comes with the verifier's *margin* (choice score of its token minus the best other
token's) and an auditor that replays the transcript reports its own choice and its
*deficit* (its choice's score minus the committed token's). For an honest pair, margin
and deficit are both at most the rounding noise, so

    committed token != auditor's token  and  margin + deficit > tolerance   => fraud

and a difference inside the tolerance is an excused near-tie. A verifier that claims a
small margin to hide only moves the burden to the auditor's deficit.

A fraud proof is made of signed messages only, so anyone can check it without a model
(`check_proof`): the node's signed requests and audit request, the accused verifier's
signed receipts (which sign the committed tokens, margins, engine and a digest of the
session's prompt and sampling), and at least two independent auditors' signed answers
that both contradict the same committed token beyond the tolerance. One auditor is not
enough: a lying auditor is outvoted by the third verifier the node asks on a dispute.
Imports no model code (the ledger checks proofs).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from libp2p.crypto.keys import KeyPair

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import (
    Opened,
    open_envelope,
    open_receipt,
    open_request,
    request_digest,
    seal,
)
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.limits import (
    MAX_AUDIT_ANSWER_BYTES,
    MAX_AUDIT_REQUEST_BYTES,
    MAX_AUDIT_TOKENS,
    MAX_FRAUD_PROOF_BYTES,
    MAX_RECEIPT_ENVELOPE_BYTES,
)

DOMAIN_AUDIT_REQUEST = "specedge-audit-request"
DOMAIN_AUDIT_ANSWER = "specedge-audit-answer"
PAYLOAD_AUDIT_REQUEST = b"specedge.v1.AuditRequest"
PAYLOAD_AUDIT_ANSWER = b"specedge.v1.AuditAnswer"

# Near-tie tolerances, in choice-score units (logits, or logits / temperature).
TOL_FLOAT32 = 0.02  # float32 on both sides: only summation order differs
TOL_SAME_REDUCED = 0.3  # the same reduced precision (bf16, fp16) on both sides
TOL_MIXED = 1.0  # different precisions or engines (a quantized GGUF, another kernel)
SCORE_CAP = 1e4  # stands for an infinite margin or deficit (a filtered-out token)


class FraudProofError(ValueError):
    """A fraud proof that proves nothing: malformed, forged, or no fraud in it."""


def tolerance(engine_a: str, engine_b: str) -> float:
    """How far apart two engines' choice scores may honestly be."""
    if engine_a.endswith("float32") and engine_b.endswith("float32"):
        return TOL_FLOAT32
    if engine_a and engine_a == engine_b:
        return TOL_SAME_REDUCED
    return TOL_MIXED


def session_digest(model_id: str, prompt: Sequence[int], sampling: pb.Sampling) -> bytes:
    """sha256 naming a session's model, prompt and sampling, signed into its receipts.

    Built by hand (not a protobuf encoding) so that every implementation gets the same
    bytes: model id length and UTF-8, prompt length and ids (u32 LE), then temperature,
    top_p (0 read as 1), top_k, seed (f32, f32, u32, u64 LE).
    """
    model = model_id.encode("utf-8")
    parts = [struct.pack("<I", len(model)), model, struct.pack("<I", len(prompt)),
             struct.pack(f"<{len(prompt)}I", *prompt),
             struct.pack("<ffIQ", sampling.temperature, sampling.top_p or 1.0,
                         sampling.top_k, sampling.seed)]
    return hashlib.sha256(b"".join(parts)).digest()


# ---------------------------------------------------------------------------- messages


def seal_audit_request(key_pair: KeyPair, request: pb.AuditRequest) -> bytes:
    return seal(key_pair, DOMAIN_AUDIT_REQUEST, PAYLOAD_AUDIT_REQUEST,
                request.SerializeToString())


def seal_audit_answer(key_pair: KeyPair, answer: pb.AuditAnswer) -> bytes:
    return seal(key_pair, DOMAIN_AUDIT_ANSWER, PAYLOAD_AUDIT_ANSWER,
                answer.SerializeToString())


def new_audit_request(key_pair: KeyPair, node_peer: str, model_id: str,
                      prompt: Sequence[int], sampling: pb.Sampling,
                      committed: Sequence[int]) -> bytes:
    """The node's signed request to replay one transcript (a fresh nonce each time)."""
    return seal_audit_request(key_pair, pb.AuditRequest(
        model_id=model_id, node_peer_id=node_peer, prompt=list(prompt), sampling=sampling,
        committed=list(committed), unix_ms=int(time.time() * 1000), nonce=os.urandom(16)))


def _parse(cls: type, payload: bytes, what: str):  # noqa: ANN202
    try:
        return cls.FromString(payload)
    except Exception as exc:  # DecodeError, ValueError
        raise ProtocolError(ErrorCode.MALFORMED, f"{what} does not parse") from exc


def open_audit_request(data: bytes, expected_peer: str | None = None,
                       vocab_size: int | None = None) -> tuple[Opened, pb.AuditRequest]:
    """Check a signed AuditRequest (signature, signer = named node, sizes, token ids)."""
    opened = open_envelope(data, DOMAIN_AUDIT_REQUEST, PAYLOAD_AUDIT_REQUEST, expected_peer,
                           max_size=MAX_AUDIT_REQUEST_BYTES)
    req = _parse(pb.AuditRequest, opened.payload, "AuditRequest")
    if req.node_peer_id != opened.peer_id:
        raise ProtocolError(ErrorCode.WRONG_PEER, "audit request names another node")
    if not req.prompt or not req.committed:
        raise ProtocolError(ErrorCode.MALFORMED, "an audit needs a prompt and committed tokens")
    if len(req.committed) > MAX_AUDIT_TOKENS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"more than {MAX_AUDIT_TOKENS} tokens to audit")
    if vocab_size is not None and max(max(req.prompt), max(req.committed)) >= vocab_size:
        raise ProtocolError(ErrorCode.TOKEN_OUT_OF_VOCAB, "token id outside the vocabulary")
    return opened, req


def open_audit_answer(data: bytes, expected_peer: str | None = None
                      ) -> tuple[Opened, pb.AuditAnswer]:
    """Check a signed AuditAnswer: the signer must be the auditor it names."""
    opened = open_envelope(data, DOMAIN_AUDIT_ANSWER, PAYLOAD_AUDIT_ANSWER, expected_peer,
                           max_size=MAX_AUDIT_ANSWER_BYTES)
    answer = _parse(pb.AuditAnswer, opened.payload, "AuditAnswer")
    if answer.auditor_peer_id != opened.peer_id:
        raise ProtocolError(ErrorCode.WRONG_PEER, "audit answer names another auditor")
    for p in answer.positions:
        if not (p.deficit >= 0 and math.isfinite(p.deficit) and math.isfinite(p.margin)):
            raise ProtocolError(ErrorCode.MALFORMED, "audit answer has a bad deficit")
    return opened, answer


# ---------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class Finding:
    """What an answer says about a transcript: the positions that differ."""

    near_ties: list[int]  # differing positions inside the tolerance (excused)
    frauds: list[int]  # differing positions beyond it

    @property
    def clean(self) -> bool:
        return not self.frauds


def judge(committed: Sequence[int], margins: Sequence[float], engine: str,
          answer: pb.AuditAnswer, request_sha256: bytes) -> Finding:
    """Compare a transcript (committed tokens, the verifier's margins) with an answer.

    Raises ProtocolError (BAD_RESULT) when the answer is not an answer to this request:
    another digest, another length, or a deficit where it agrees.
    """
    if bytes(answer.request_sha256) != request_sha256:
        raise ProtocolError(ErrorCode.BAD_RESULT, "audit answer is for another request")
    if len(answer.positions) != len(committed):
        raise ProtocolError(ErrorCode.BAD_RESULT, "audit answer has the wrong length")
    tol = tolerance(engine, answer.engine)
    near, fraud = [], []
    for i, (token, margin, pos) in enumerate(zip(committed, margins, answer.positions,
                                                 strict=True)):
        if pos.token == token:
            if pos.deficit != 0:
                raise ProtocolError(ErrorCode.BAD_RESULT, "a deficit where the answer agrees")
            continue
        (fraud if max(margin, 0.0) + pos.deficit > tol else near).append(i)
    return Finding(near, fraud)


# ---------------------------------------------------------------------------- proofs


@dataclass(frozen=True)
class ProvenFraud:
    accused: str
    node: str
    position: int  # index into the session's committed tokens
    committed_token: int
    auditors: list[str]
    auditor_tokens: list[int]
    model_id: str


def _transcript(proof: pb.FraudProof) -> tuple[str, list[int], list[float], str, bytes]:
    """(node, committed tokens, margins, engine, session digest) from the proof's
    request/receipt pairs, which must be one whole session, seq 1, 2, ..."""
    if not proof.receipts or len(proof.receipts) != len(proof.requests):
        raise FraudProofError("a proof needs one receipt per request")
    if not proof.accused_peer_id:
        raise FraudProofError("a proof names the accused")
    committed: list[int] = []
    margins: list[float] = []
    engine = digest = node = session = None
    for seq, (req_env, rec_env) in enumerate(zip(proof.requests, proof.receipts,
                                                 strict=True), start=1):
        _, rec = open_receipt(bytes(rec_env), expected_peer=proof.accused_peer_id)
        _, req = open_request(bytes(req_env), expected_peer=rec.node_peer_id)
        if len(rec_env) > MAX_RECEIPT_ENVELOPE_BYTES or rec.seq != seq or req.seq != seq:
            raise FraudProofError("receipts are not the session's rounds in order")
        if rec.request_sha256 != request_digest(bytes(req_env)):
            raise FraudProofError("a receipt names another request")
        if session is not None and (rec.session_id != session or rec.node_peer_id != node
                                    or rec.engine != engine or rec.session_sha256 != digest):
            raise FraudProofError("receipts from different sessions")
        session, node, engine, digest = (rec.session_id, rec.node_peer_id, rec.engine,
                                         bytes(rec.session_sha256))
        if len(rec.positions) != rec.accepted + 1:
            raise FraudProofError("a receipt without its positions")
        committed.extend(int(p.token) for p in rec.positions)
        margins.extend(float(p.margin) for p in rec.positions)
    assert node is not None and engine is not None and digest is not None
    return node, committed, margins, engine, digest


def check_proof(data: bytes) -> ProvenFraud:
    """Check a serialized FraudProof; return what it proves or raise FraudProofError.

    Every signature is checked; the audit request must be the node's, name the session's
    prompt and sampling (the digest the receipts signed) and replay exactly the committed
    tokens; at least two auditors other than the accused, each answering that request,
    must find the same position fraudulent beyond the tolerance.
    """
    if len(data) > MAX_FRAUD_PROOF_BYTES:
        raise FraudProofError("proof too large")
    try:
        proof = pb.FraudProof.FromString(bytes(data))
        node, committed, margins, engine, digest = _transcript(proof)
        _, audit = open_audit_request(bytes(proof.audit_request), expected_peer=node)
        if session_digest(audit.model_id, audit.prompt, audit.sampling) != digest:
            raise FraudProofError("the audit request is not this session's prompt/sampling")
        if list(audit.committed) != committed:
            raise FraudProofError("the audit request replays other tokens than the receipts")
        wanted = request_digest(bytes(proof.audit_request))
        pos = int(proof.position)
        auditors: dict[str, int] = {}
        for env in proof.answers:
            _, answer = open_audit_answer(bytes(env))
            if answer.auditor_peer_id in (proof.accused_peer_id, node):
                raise FraudProofError("an auditor must be neither the accused nor the node")
            if answer.model_id != audit.model_id:
                raise FraudProofError("an auditor ran another model")
            finding = judge(committed, margins, engine, answer, wanted)
            if pos in finding.frauds:
                auditors[answer.auditor_peer_id] = int(answer.positions[pos].token)
    except ProtocolError as exc:
        raise FraudProofError(f"invalid proof: {exc}") from None
    if len(auditors) < 2:
        raise FraudProofError(f"position {pos} is not shown fraudulent by two independent "
                              f"auditors (found {len(auditors)})")
    return ProvenFraud(proof.accused_peer_id, node, pos, committed[pos], list(auditors),
                       list(auditors.values()), audit.model_id)
