"""Checkable receipts, the fraud rule, fraud proofs and the node's auditor, in-process.

The real-process tests (honest networks, cheating verifiers) are in
test_audit_network.py. Here the pieces are driven directly: TargetSession plays the
honest verifier, a cheater is a set of signed claims, auditors run `audit_facts` on the
tiny target and sign their answers.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys

import pytest
import torch
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from node_fakes import MemStream

from specedge.audit import Facts, ReceiptContradiction, check_round
from specedge.ledger import open_ledger
from specedge.ledger.frauds import CLEAR_AFTER, credit_state
from specedge.node.audit import Auditor, AuditPolicy, rate_after
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.audits import (
    FraudProofError,
    check_proof,
    judge,
    new_audit_request,
    open_audit_answer,
    open_audit_request,
    seal_audit_answer,
    session_digest,
    tolerance,
)
from specedge.protocol.envelopes import request_digest, request_envelope, seal_request
from specedge.protocol.framing import read_frame, write_frame
from specedge.protocol.identity import peer_id_of
from specedge.sampling import SamplingParams
from specedge.verification import TargetSession
from specedge.verifier.engine import audit_facts
from specedge.verifier.receipts import make_receipt

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, seed=11)
MODEL = "tiny-test"


def sampling_msg(p: SamplingParams) -> pb.Sampling:
    return pb.Sampling(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed)


def chain(tokens: list[int]) -> list[int]:
    return [i - 1 for i in range(len(tokens))]


class Transcript:
    """A session's signed rounds, as a verifier (honest or not) produced them."""

    def __init__(self, node_key, verifier_key, prompt: list[int], params: SamplingParams):
        self.node_key, self.verifier_key = node_key, verifier_key
        self.prompt, self.params = prompt, params
        self.sid = bytes(range(16))
        self.requests: list[bytes] = []
        self.receipts: list[bytes] = []
        self.committed: list[int] = []
        self.margins: list[float] = []
        self.digest = session_digest(MODEL, prompt, sampling_msg(params))

    def add(self, tokens: list[int], accepted: list[int], facts: list[Facts]) -> None:
        req = pb.VerifyRequest(session_id=self.sid, seq=len(self.requests) + 1, tokens=tokens,
                               parents=chain(tokens))
        env = seal_request(self.node_key, req)
        receipt = make_receipt(
            self.verifier_key, verifier_peer=peer_id_of(self.verifier_key),
            node_peer=peer_id_of(self.node_key), request=req, request_envelope=env,
            accepted=len(accepted), verify_seconds=0.001, model_id=MODEL, facts=facts,
            session_sha256=self.digest, engine="torch/float32",
            first_position=len(self.prompt) + len(self.committed))
        self.requests.append(env)
        self.receipts.append(receipt)
        self.committed.extend(f.token for f in facts)
        self.margins.extend(f.margin for f in facts)


def honest_session(target, prompt, params, drafts, node_key, verifier_key) -> Transcript:
    t = Transcript(node_key, verifier_key, prompt, params)
    ts = TargetSession(target, prompt, params)
    ts.top_logprobs = 2
    for tokens in drafts:
        verdict = ts.verify(tokens, chain(tokens))
        t.add(tokens, verdict.accepted, verdict.facts)
    return t


def lazy_session(prompt, params, drafts, node_key, verifier_key) -> Transcript:
    """A verifier that never ran the target: every draft token accepted, bonus 0,
    facts forged to be self-consistent."""
    t = Transcript(node_key, verifier_key, prompt, params)
    for tokens in drafts:
        committed = [*tokens, 0]
        t.add(tokens, list(range(len(tokens))),
              [Facts(c, -1.0, 0.0, 0.0, [c, c + 1], [-1.0, -1.0]) for c in committed])
    return t


def answer(key, request_env: bytes, target, *, engine: str = "torch/float32",
           lie: bool = False) -> bytes:
    """An auditor's signed answer (honest: the target's replay)."""
    _, req = open_audit_request(request_env)
    s = req.sampling
    params = SamplingParams(s.temperature, s.top_p or 1.0, s.top_k, s.seed)
    facts = audit_facts(target, list(req.prompt), list(req.committed), params)
    if lie:
        facts = [Facts((f.token + 1) % 256, f.logprob, 5.0, 5.0) for f in facts]
    return seal_audit_answer(key, pb.AuditAnswer(
        auditor_peer_id=peer_id_of(key), request_sha256=request_digest(request_env),
        model_id=MODEL, engine=engine,
        positions=[pb.AuditPosition(token=f.token, logprob=f.logprob, margin=f.margin,
                                    deficit=f.deficit) for f in facts]))


def proof_of(t: Transcript, answers: list[bytes], audit_env: bytes, position: int) -> bytes:
    return pb.FraudProof(accused_peer_id=peer_id_of(t.verifier_key), requests=t.requests,
                         receipts=t.receipts, audit_request=audit_env, answers=answers,
                         position=position).SerializeToString()


@pytest.fixture(scope="module")
def keys():
    return [create_new_key_pair() for _ in range(4)]  # node, verifier, auditor 1, 2


@pytest.fixture(scope="module")
def drafts(tiny_pair, tiny_prompts):
    """Chains the tiny draft model would send: its greedy continuation, four at a time."""
    draft = tiny_pair[0]
    prompt = tiny_prompts[0]
    ids = prompt[:]
    with torch.inference_mode():
        for _ in range(12):
            ids.append(int(draft(torch.tensor([ids])).logits[0, -1].argmax()))
    cont = ids[len(prompt):]
    return prompt, [cont[0:4], cont[4:8], cont[8:12]]


def fraud_case(tiny_pair, keys, drafts):
    target = tiny_pair[1]
    node, verifier, a1, a2 = keys
    prompt, chains = drafts
    t = lazy_session(prompt, GREEDY, chains, node, verifier)
    env = new_audit_request(node, peer_id_of(node), MODEL, prompt, sampling_msg(GREEDY),
                            t.committed)
    answers = [answer(a1, env, target), answer(a2, env, target)]
    _, first = open_audit_answer(answers[0])
    finding = judge(t.committed, t.margins, "torch/float32", first, request_digest(env))
    assert finding.frauds, "the lazy transcript must contradict the target"
    return t, env, answers, finding.frauds[0]


# ---------------------------------------------------------------------------- receipts


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_honest_receipts_recheck_and_forged_ones_contradict_themselves(tiny_pair, drafts,
                                                                       params):
    target = tiny_pair[1]
    prompt, chains = drafts
    ts = TargetSession(target, prompt, params)
    ts.top_logprobs = 2
    vocab = target.get_output_embeddings().weight.shape[0]
    seen_accept = False
    for tokens in chains:
        first = len(ts.tokens)
        v = ts.verify(tokens, chain(tokens))
        check_round(tokens, chain(tokens), v.accepted, v.bonus, v.facts, params, first, 2, vocab)
        if v.accepted:  # a verifier that stops early although the first child matched
            seen_accept = True
            with pytest.raises(ReceiptContradiction, match="acceptance rule"):
                check_round(tokens, chain(tokens), [], tokens[0], v.facts[:1], params, first,
                            2, vocab)
        # A token that is not the target's own: its listing cannot be made to agree.
        bad = v.facts[-1]
        other = bad.top_tokens[1]
        forged = Facts(other, bad.top_logprobs[1], bad.margin, 0.0, bad.top_tokens,
                       bad.top_logprobs)
        with pytest.raises(ReceiptContradiction):
            check_round(tokens, chain(tokens), v.accepted, other, [*v.facts[:-1], forged],
                        params, first, 2, vocab)
    assert seen_accept or params is SAMPLED


def test_tolerance_separates_near_ties_from_fraud():
    assert tolerance("torch/float32", "torch/float32") == 0.02
    assert tolerance("torch/bfloat16", "torch/bfloat16") == 0.3
    assert tolerance("torch/bfloat16", "llama.cpp/Q4_K_M") == 1.0
    ans = pb.AuditAnswer(request_sha256=b"h" * 32, engine="torch/bfloat16", positions=[
        pb.AuditPosition(token=1), pb.AuditPosition(token=9, deficit=0.1),
        pb.AuditPosition(token=9, deficit=0.25)])
    found = judge([1, 2, 3], [0.0, 0.1, 0.1], "torch/bfloat16", ans, b"h" * 32)
    assert found.near_ties == [1] and found.frauds == [2]
    with pytest.raises(Exception, match="another request"):
        judge([1, 2, 3], [0, 0, 0], "torch/bfloat16", ans, b"x" * 32)


def test_audit_rate_adapts_like_boinc():
    assert [rate_after(n) for n in (0, 4)] == [1.0, 1.0]
    assert rate_after(10) == 0.5 and rate_after(1000) == 0.05
    policy = AuditPolicy(0.25)
    assert policy.rate("x") == 0.25
    with pytest.raises(ValueError):
        AuditPolicy(1.5)


# ---------------------------------------------------------------------------- proofs


def test_fraud_proof_checks_and_a_third_process_agrees(tiny_pair, keys, drafts, tmp_path):
    t, env, answers, pos = fraud_case(tiny_pair, keys, drafts)
    proof = proof_of(t, answers, env, pos)
    found = check_proof(proof)
    assert found.accused == peer_id_of(keys[1]) and found.position == pos
    assert sorted(found.auditors) == sorted(peer_id_of(k) for k in keys[2:])
    # The ledger keeps it once, lists it, forfeits the credit, and `verify` re-checks it.
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    with open_ledger(url) as ledger:
        assert ledger.store_proof(proof).new and not ledger.store_proof(proof).new
        assert ledger.verify().ok
        honest = peer_id_of(keys[2])
        assert credit_state(ledger.engine, honest) == "pending"
        for _ in range(CLEAR_AFTER):
            ledger.record_audit(honest, peer_id_of(keys[3]), b"s" * 16, 30, 0)
        assert credit_state(ledger.engine, honest) == "cleared"
        assert credit_state(ledger.engine, found.accused) == "forfeited"
    path = tmp_path / "proof.pb"
    path.write_bytes(proof)
    cli = [sys.executable, "-m", "specedge.ledger.cli"]
    out = subprocess.run([*cli, "frauds", str(path), "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["accused"] == found.accused
    out = subprocess.run([*cli, "--ledger", url, "frauds", "--json"], capture_output=True,
                         text=True, timeout=120)
    rows = json.loads(out.stdout)
    assert [r["accused"] for r in rows] == [found.accused]
    assert rows[0]["credit"] == "forfeited"


def test_forged_or_empty_proofs_are_refused(tiny_pair, keys, drafts):
    t, env, answers, pos = fraud_case(tiny_pair, keys, drafts)
    target = tiny_pair[1]
    node, verifier, a1, a2 = keys
    # One auditor is not enough, nor the same one twice.
    with pytest.raises(FraudProofError, match="two independent"):
        check_proof(proof_of(t, answers[:1], env, pos))
    with pytest.raises(FraudProofError, match="two independent"):
        check_proof(proof_of(t, [answers[0], answers[0]], env, pos))
    # A flipped byte anywhere in a signed part.
    forged = bytearray(t.receipts[0])
    forged[-3] ^= 1
    t.receipts[0] = bytes(forged)
    with pytest.raises(FraudProofError, match="signature"):
        check_proof(proof_of(t, answers, env, pos))
    # An audit request that replays other tokens than the receipts signed.
    t2, env2, answers2, pos2 = fraud_case(tiny_pair, keys, drafts)
    other = new_audit_request(node, peer_id_of(node), MODEL, t2.prompt, sampling_msg(GREEDY),
                              [*t2.committed[:-1], (t2.committed[-1] + 1) % 256])
    with pytest.raises(FraudProofError, match="other tokens"):
        check_proof(proof_of(t2, [answer(a1, other, target), answer(a2, other, target)],
                             other, pos2))
    # Against an honest verifier there is nothing to prove.
    prompt, chains = drafts
    honest = honest_session(target, prompt, GREEDY, chains, node, verifier)
    env3 = new_audit_request(node, peer_id_of(node), MODEL, prompt, sampling_msg(GREEDY),
                             honest.committed)
    with pytest.raises(FraudProofError):
        check_proof(proof_of(honest, [answer(a1, env3, target), answer(a2, env3, target)],
                             env3, 0))


# ---------------------------------------------------------------------------- the auditor


class NoShuffle(random.Random):
    def shuffle(self, x):  # noqa: ANN001
        pass  # ask candidates in the order given


class Cand:
    def __init__(self, key, lie: bool = False) -> None:
        self.key, self.lie = key, lie
        self.peer = peer_id_of(key)
        self.asked = 0


def auditor_for(nursery, node_key, cands, target, **kw) -> Auditor:
    async def serve(stream, cand) -> None:
        frame = await read_frame(stream, timeout=30)
        env = frame.audit_request.SerializeToString()
        signed = await trio.to_thread.run_sync(
            lambda: answer(cand.key, env, target, lie=cand.lie))
        await write_frame(stream, pb.Frame(audit_answer=request_envelope(signed)))

    async def open_stream(cand):  # noqa: ANN001, ANN202
        cand.asked += 1
        a, b = trio.testing.memory_stream_pair()
        nursery.start_soon(serve, MemStream(b), cand)
        return MemStream(a)

    return Auditor(node_key, lambda: cands, open_stream,
                   policy=AuditPolicy(1.0, rng=NoShuffle()), **kw)


def as_node_transcript(t: Transcript):
    from specedge.node.audit import Transcript as NodeTranscript

    return NodeTranscript(peer_id_of(t.verifier_key), MODEL, t.prompt, sampling_msg(t.params),
                          t.committed, t.margins, "torch/float32", t.requests, t.receipts,
                          t.sid)


def test_a_lying_auditor_is_outvoted_and_never_believed_alone(tiny_pair, keys, drafts):
    target = tiny_pair[1]
    node, verifier, a1, a2 = keys
    prompt, chains = drafts
    honest = honest_session(target, prompt, GREEDY, chains, node, verifier)
    liar, fair = Cand(create_new_key_pair(), lie=True), Cand(a2)
    banned, kept = [], []

    async def main() -> tuple[Auditor, object, object]:
        async with trio.open_nursery() as nursery:
            aud = auditor_for(nursery, node, [liar, fair], target,
                              ban=lambda v, why: banned.append(v), keep_proof=kept.append)
            first = await aud.audit(as_node_transcript(honest))
            lazy = lazy_session(prompt, GREEDY, chains, node, verifier)
            second = await aud.audit(as_node_transcript(lazy))
            return aud, first, second

    aud, first, second = trio.run(main)
    # The liar spoke first on the honest session: the third verifier sided with the
    # verifier, nobody was accused, and the liar is never asked again.
    assert first.clean and aud.stats.lying_auditors == 1 and liar.peer in aud.distrusted
    # The lazy session had only one trusted auditor left: unresolved, no proof (one
    # auditor is never believed alone).
    assert second is None and aud.stats.unresolved == 1 and not kept and not banned


def test_two_honest_auditors_convict_and_the_proof_is_kept(tiny_pair, keys, drafts):
    target = tiny_pair[1]
    node, verifier, a1, a2 = keys
    prompt, chains = drafts
    cands = [Cand(a1), Cand(a2)]
    banned, kept = [], []

    async def main() -> Auditor:
        async with trio.open_nursery() as nursery:
            aud = auditor_for(nursery, node, cands, target,
                              ban=lambda v, why: banned.append(v), keep_proof=kept.append)
            lazy = lazy_session(prompt, GREEDY, chains, node, verifier)
            found = await aud.audit(as_node_transcript(lazy))
            assert found is not None and found.frauds
            return aud

    aud = trio.run(main)
    assert aud.stats.frauds == 1 and aud.stats.disputes == 1
    assert banned == [peer_id_of(verifier)] and peer_id_of(verifier) in aud.banned
    assert check_proof(kept[0]).accused == peer_id_of(verifier)


def test_a_chunked_replay_chooses_what_the_verifier_chose(tiny_pair, drafts):
    """The auditor's replay, in any chunk size, agrees with an honest verifier's session
    at every position (float32: no near-ties on these prompts)."""
    target = tiny_pair[1]
    prompt, chains = drafts
    ts = TargetSession(target, prompt, SAMPLED)
    committed = []
    for tokens in chains:
        committed += ts.verify(tokens, chain(tokens)).new_tokens
    for size in (3, 7, 512):
        facts = audit_facts(target, prompt, committed, SAMPLED, chunk=size)
        assert [f.token for f in facts] == committed
        assert all(f.deficit == 0 for f in facts)


@pytest.mark.slow
def test_gossip_delivers_valid_proofs_and_drops_forged_ones(tiny_pair, keys, drafts):
    """Three hosts on the fraud topic (a relay between a publisher and a listener): the
    listener hears the valid proof once and never the forged one."""
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    from specedge.protocol import hosts
    from specedge.protocol.gossip import fraud_gossip

    t, env, answers, pos = fraud_case(tiny_pair, keys, drafts)
    valid = proof_of(t, answers, env, pos)
    forged = proof_of(t, answers[:1], env, pos)
    heard: list[str] = []

    async def main() -> None:
        with trio.fail_after(60):
            async with contextlib.AsyncExitStack() as stack:
                relay, pub, sub = [await stack.enter_async_context(hosts.running_host(
                    create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"])) for _ in range(3)]
                await stack.enter_async_context(fraud_gossip(relay))
                gossip = await stack.enter_async_context(fraud_gossip(pub))
                await stack.enter_async_context(
                    fraud_gossip(sub, lambda data, found: heard.append(found.accused)))
                where = info_from_p2p_addr(Multiaddr(hosts.peer_addrs(relay)[0]))
                for h in (pub, sub):
                    await h.connect(where)
                await trio.sleep(3)  # meshes form on the 1 s heartbeat
                for data in (forged, valid):
                    with contextlib.suppress(Exception):  # our own validator may refuse
                        await gossip.publish(data)
                with trio.move_on_after(10):
                    while not heard:
                        await trio.sleep(0.2)
                await trio.sleep(1)

    trio.run(main)
    assert heard == [peer_id_of(keys[1])]
