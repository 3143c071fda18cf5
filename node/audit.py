"""The node's audits: replay sampled sessions on other verifiers, prove fraud, ban.

A receipt is signed, but a signature only says who answered, not that the answer is the
target's. So the node samples sessions and has another verifier, chosen at random among
those that did not serve the session, replay the transcript (prompt, sampling and the
committed tokens; never the first verifier's answers). The rule that decides is
`protocol.audits.judge`: a committed token the auditor would not have chosen, beyond the
near-tie tolerance, is a fraud. One auditor is not believed alone: on a disagreement a
third verifier replays the same signed request, and only when it agrees with the auditor
does the node hold a fraud proof (checkable by anyone: `protocol.audits.check_proof`).
It then bans the verifier, keeps the proof (its ledger, a file) and hands it to
`publish` (the network's fraud topic). If the third verifier sides with the first, the
auditor lied: it is never asked again, and nothing is held against the verifier.

How often (after BOINC's adaptive replication): every session of a verifier this node
has not yet seen audited clean `TRUST_AFTER` times, then less often, down to
`FLOOR_RATE`. `--audit-rate R` fixes the rate. With `--audit-sync` each round is audited
before its tokens are used (rate 1 by construction), so the output is exact even when a
verifier cheats: a fraudulent round is dropped and re-verified elsewhere.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio
from libp2p.crypto.keys import KeyPair

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.audits import (
    Finding,
    check_proof,
    judge,
    new_audit_request,
    open_audit_answer,
)
from specedge.protocol.envelopes import request_digest, request_envelope
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.identity import peer_id_of
from specedge.protocol.limits import FRAME_LIMITS, MAX_AUDIT_TOKENS, SILENCE_TIMEOUT
from specedge.protocol.validation import expect

if TYPE_CHECKING:
    from specedge.node.client import Session

log = logging.getLogger("specedge.node.audit")

TRUST_AFTER = 5  # clean audits of a verifier before its sessions are sampled
FLOOR_RATE = 0.05  # the lowest sampling rate, however long a verifier has been clean
AUDIT_TIMEOUT = 120.0  # the longest wait for one replay, whatever the estimate
AUDIT_SLACK = 4.0  # times the auditor's own prefill estimate a replay may take
AUDITORS_TRIED = 3  # auditors asked in turn when one cannot be reached


class AuditTarget(Protocol):
    """A verifier the node can ask for an audit (`discovery.Candidate`)."""

    @property
    def peer(self) -> str: ...


OpenStream = Callable[[AuditTarget], Awaitable[object]]


@dataclass
class AuditStats:
    audits: int = 0  # answers judged
    sessions_audited: int = 0
    clean: int = 0
    disagreements: int = 0  # answers that contradicted a receipt beyond the tolerance
    near_ties: int = 0  # differing positions excused as near-ties
    disputes: int = 0  # third verifiers asked
    frauds: int = 0  # fraud proofs made
    lying_auditors: int = 0  # auditors outvoted by the third verifier
    unresolved: int = 0  # a disagreement no third verifier could settle
    skipped: int = 0  # sampled, but no auditor available
    seconds: float = 0.0  # wall time spent waiting for answers

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class AuditPolicy:
    """Which sessions to audit: adaptive per verifier, or a fixed rate."""

    def __init__(self, fixed: float | None = None, trust_after: int = TRUST_AFTER,
                 floor: float = FLOOR_RATE, rng: random.Random | None = None) -> None:
        if fixed is not None and not 0.0 <= fixed <= 1.0:
            raise ValueError(f"--audit-rate must be in [0, 1], got {fixed}")
        self.fixed, self.trust_after, self.floor = fixed, trust_after, floor
        self.rng = rng or random.SystemRandom()
        self.clean: dict[str, int] = {}

    def rate(self, verifier: str) -> float:
        """The probability that a session on `verifier` is audited."""
        if self.fixed is not None:
            return self.fixed
        return rate_after(self.clean.get(verifier, 0), self.trust_after, self.floor)

    def sample(self, verifier: str) -> bool:
        return self.rng.random() < self.rate(verifier)

    def record_clean(self, verifier: str) -> None:
        self.clean[verifier] = self.clean.get(verifier, 0) + 1


def rate_after(clean: int, trust_after: int = TRUST_AFTER, floor: float = FLOOR_RATE) -> float:
    """Every session until `trust_after` clean audits, then trust_after / clean, floored."""
    if clean < trust_after:
        return 1.0
    return max(floor, trust_after / clean)


@dataclass(frozen=True)
class Transcript:
    """One session as an auditor replays it and a proof cites it."""

    verifier: str
    model_id: str
    prompt: list[int]
    sampling: pb.Sampling
    committed: list[int]
    margins: list[float]
    engine: str
    requests: list[bytes]
    receipts: list[bytes]
    session_id: bytes = b""

    @classmethod
    def of(cls, session: Session) -> Transcript:
        kept = session.receipts
        return cls(session.verifier, session.model_id, list(session.request.prompt),
                   session.request.sampling(), list(session.committed),
                   [f.margin for r in kept for f in r.facts],
                   kept[0].engine if kept else "",
                   [r.request_envelope for r in kept], [r.receipt_envelope for r in kept],
                   kept[0].session_id if kept else b"")


def replay_timeout(cand: AuditTarget, tokens: int) -> float:
    """How long to wait for a replay of `tokens`: the silence timeout plus a multiple of
    what the auditor's advertised prefill speed says it takes (a frozen or dead auditor
    is left within seconds; another is asked), at most AUDIT_TIMEOUT."""
    advert = getattr(cand, "advert", None)
    rate = getattr(advert, "prefill_tokens_per_s", 0.0) or 0.0
    if rate <= 0:  # not measured yet
        return 3 * SILENCE_TIMEOUT
    return min(SILENCE_TIMEOUT + AUDIT_SLACK * tokens / rate, AUDIT_TIMEOUT)


class Auditor:
    """Audits sessions for one node; see the module docstring.

    `candidates()` lists the verifiers it may ask (ranked `discovery.Candidate`s);
    `open_stream(candidate)` opens an audit stream to one. `keep_proof(bytes)` and
    `publish(bytes)` receive each fraud proof; `ban(verifier, why)` stops its use.
    """

    def __init__(self, identity: KeyPair, candidates: Callable[[], Sequence[AuditTarget]],
                 open_stream: OpenStream, *, policy: AuditPolicy | None = None,
                 sync: bool = False, ban: Callable[[str, str], None] | None = None,
                 keep_proof: Callable[[bytes], None] | None = None,
                 keep_clean: Callable[[str, str, bytes, int, int], None] | None = None,
                 publish: Callable[[bytes], Awaitable[None]] | None = None,
                 proof_dir: Path | None = None) -> None:
        self.identity = identity
        self.node = peer_id_of(identity)
        self.candidates, self.open_stream = candidates, open_stream
        self.policy = policy or AuditPolicy()
        self.sync = sync
        self._ban, self.keep_proof, self.publish = ban, keep_proof, publish
        self.keep_clean = keep_clean  # (verifier, auditor, session id, tokens, near-ties)
        self.proof_dir = proof_dir
        self.stats = AuditStats()
        self.banned: dict[str, str] = {}  # verifier -> why (a proof's digest)
        self.distrusted: set[str] = set()  # auditors caught lying
        self.proofs: list[bytes] = []
        self._send, self._receive = trio.open_memory_channel[Transcript](math.inf)
        self._idle = trio.Event()
        self._idle.set()
        self._pending = 0

    # -- hooks the pool calls ---------------------------------------------------------

    def session_ended(self, session: Session) -> None:
        """A session is over: audit it in the background if sampled (async mode)."""
        if self.sync or not session.receipts or session.verifier in self.banned:
            return
        if not self.policy.sample(session.verifier):
            return
        if len(session.committed) > MAX_AUDIT_TOKENS:
            self.stats.skipped += 1
            return
        self._pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            self._send.send_nowait(Transcript.of(session))
        except trio.ClosedResourceError:
            self._done()

    async def before_use(self, session: Session) -> None:
        """Sync mode: audit the session's transcript including its newest round; raise
        ProtocolError (BAD_RESULT) unless it is clean, so the round is re-verified."""
        found = await self.audit(Transcript.of(session))
        if found is None:
            raise ProtocolError(ErrorCode.BAD_RESULT, "round not audited: no auditor could "
                                "settle it")
        if not found.clean:
            raise ProtocolError(ErrorCode.BAD_RESULT, f"audit: verifier {session.verifier} "
                                f"committed a token the target would not choose")

    # -- the background worker --------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Audit queued sessions one at a time until `close()` and the queue is empty."""
        task_status.started()
        async with self._receive:
            async for transcript in self._receive:
                try:
                    await self.audit(transcript)
                except Exception:
                    log.exception("audit of a session on %s failed", transcript.verifier)
                finally:
                    self._done()

    def close(self) -> None:
        self._send.close()

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) until every queued audit is done."""
        with trio.move_on_after(timeout):
            await self._idle.wait()

    def _done(self) -> None:
        self._pending -= 1
        if self._pending <= 0:
            self._pending = 0
            self._idle.set()

    # -- one audit --------------------------------------------------------------------

    async def audit(self, t: Transcript) -> Finding | None:
        """Audit one transcript; the finding that stands (None: none could be had)."""
        if not t.committed:
            return Finding([], [])
        env = new_audit_request(self.identity, self.node, t.model_id, t.prompt, t.sampling,
                                t.committed)
        digest = request_digest(env)
        first = await self._answer(env, t, exclude={t.verifier})
        if first is None:
            self.stats.skipped += 1
            return None
        self.stats.sessions_audited += 1
        auditor, answer_env, finding = first
        if finding.clean:
            await self._clean(t, auditor, finding)
            return finding
        self.stats.disagreements += 1
        self.stats.disputes += 1
        second = await self._answer(env, t, exclude={t.verifier, auditor})
        if second is None:
            self.stats.unresolved += 1
            log.warning("auditor %s contradicts verifier %s and no third verifier could "
                        "settle it", auditor, t.verifier)
            return None
        other, other_env, other_finding = second
        shared = [p for p in finding.frauds if p in other_finding.frauds]
        if not shared:  # the third verifier sides with the first: the auditor lied
            self.stats.lying_auditors += 1
            self.distrusted.add(auditor)
            log.warning("auditor %s was contradicted by %s: not believed", auditor, other)
            if other_finding.clean:
                await self._clean(t, other, other_finding)
            return other_finding
        proof = pb.FraudProof(accused_peer_id=t.verifier, requests=t.requests,
                              receipts=t.receipts, audit_request=env,
                              answers=[answer_env, other_env], position=shared[0])
        await self._convict(t.verifier, proof.SerializeToString(), digest)
        return Finding(finding.near_ties, shared)

    async def _clean(self, t: Transcript, auditor: str, finding: Finding) -> None:
        self.policy.record_clean(t.verifier)
        self.stats.clean += 1
        if self.keep_clean is not None:
            try:
                await trio.to_thread.run_sync(self.keep_clean, t.verifier, auditor,
                                              t.session_id, len(t.committed),
                                              len(finding.near_ties))
            except Exception as exc:
                log.warning("could not record the audit: %s", exc)

    async def _answer(self, env: bytes, t: Transcript, exclude: set[str]
                      ) -> tuple[str, bytes, Finding] | None:
        """(auditor, its signed answer, the finding) from a random eligible verifier."""
        pool = [c for c in self.candidates() if c.peer not in exclude
                and c.peer not in self.banned and c.peer not in self.distrusted]
        self.policy.rng.shuffle(pool)
        for cand in pool[:AUDITORS_TRIED]:
            start = time.perf_counter()
            try:
                answer_env = await self._ask(cand, env, len(t.prompt) + len(t.committed))
                _, answer = open_audit_answer(answer_env, expected_peer=cand.peer)
                finding = judge(t.committed, t.margins, t.engine, answer, request_digest(env))
            except (ProtocolError, ConnectionError) as exc:
                log.info("auditor %s gave no usable answer: %s", cand.peer, exc)
                continue
            finally:
                self.stats.seconds += time.perf_counter() - start
            self.stats.audits += 1
            self.stats.near_ties += len(finding.near_ties)
            if finding.near_ties:
                log.info("audit by %s excused %d near-ties of %s", cand.peer,
                         len(finding.near_ties), t.verifier)
            return cand.peer, answer_env, finding
        return None

    async def _ask(self, cand: AuditTarget, env: bytes, tokens: int) -> bytes:
        stream = await self.open_stream(cand)
        try:
            await write_frame(stream, pb.Frame(audit_request=request_envelope(env)))
            frame = await read_frame(stream, max_size=FRAME_LIMITS["audit_answer"],
                                     timeout=replay_timeout(cand, tokens))
            expect(frame, "audit_answer")
            return frame.audit_answer.SerializeToString()
        finally:
            with trio.move_on_after(2.0) as scope:
                scope.shield = True
                try:
                    await stream.close()
                except Exception:
                    pass

    async def _convict(self, verifier: str, proof: bytes, digest: bytes) -> None:
        """Keep, publish and act on a fraud proof (checked first, as anyone would)."""
        found = check_proof(proof)
        self.stats.frauds += 1
        self.proofs.append(proof)
        why = f"fraud proven at position {found.position} (proof {digest.hex()[:16]})"
        self.banned[verifier] = why
        log.warning("verifier %s cheated: %s", verifier, why)
        if self._ban is not None:
            self._ban(verifier, why)
        if self.proof_dir is not None:
            self.proof_dir.mkdir(parents=True, exist_ok=True)
            path = self.proof_dir / f"fraud-{verifier[-12:]}-{digest.hex()[:16]}.pb"
            await trio.to_thread.run_sync(path.write_bytes, proof)
        if self.keep_proof is not None:
            try:
                await trio.to_thread.run_sync(self.keep_proof, proof)
            except Exception as exc:  # a full disk must not hide the ban
                log.warning("could not store the fraud proof: %s", exc)
        if self.publish is not None:
            try:
                await self.publish(proof)
            except Exception as exc:
                log.warning("could not publish the fraud proof: %s", exc)

    def adopt(self, proof: bytes, verifier: str, why: str) -> None:
        """Another node's (checked) proof: ban the verifier and keep the proof too."""
        self.banned.setdefault(verifier, why)
        if self.keep_proof is not None:
            try:
                self.keep_proof(proof)
            except Exception as exc:
                log.warning("could not store a fraud proof heard on the network: %s", exc)

    def status(self) -> dict[str, object]:
        """For the status display and `generate --json`."""
        return {**self.stats.as_dict(), "banned": dict(self.banned),
                "rates": {v: round(self.policy.rate(v), 3) for v in self.policy.clean}}
