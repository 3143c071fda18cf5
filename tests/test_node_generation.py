"""The node's drafting loop against in-process verifiers speaking the real protocol:
exactness, proactive drafting, failover (death, stall, refusal, a lying receipt),
receipts, and the errors a user sees."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from node_fakes import FakeConnector, FakeVerifier

from specedge.engine import autoregressive_generate
from specedge.node.client import Liveness
from specedge.node.generation import (
    NoVerifierError,
    VocabularyMismatch,
    generate,
)
from specedge.node.receipts import receipt_book
from specedge.protocol.envelopes import open_receipt, open_request
from specedge.protocol.identity import peer_id_of
from specedge.sampling import SamplingParams
from specedge.text import eos_ids
from specedge.trees import TreeShape


def run_generation(draft, verifiers, prompt, n, liveness=None, **kw):
    identity = create_new_key_pair()
    events = []
    kw.setdefault("eos_ids", [258])  # tiny tokenizer's <|im_end|>, also its config's eos

    async def main():
        async with trio.open_nursery() as nursery:
            conn = FakeConnector(nursery, identity, verifiers, liveness)
            try:
                return await generate(draft, prompt, n, connector=conn, model_id="tiny-test",
                                      on_event=lambda k, i: events.append((k, i)), **kw)
            except Exception as exc:  # raised outside the nursery, not in a group
                return exc
            finally:
                nursery.cancel_scope.cancel()

    gen = trio.run(main)
    if isinstance(gen, Exception):
        raise gen
    return gen, events, identity


def reference(target, tok, prompt, n, params=None):
    assert eos_ids(tok, target.generation_config) == [258]
    return autoregressive_generate(target, prompt, n, params or SamplingParams(),
                                   eos_ids=eos_ids(tok, target.generation_config)).token_ids


@pytest.mark.parametrize("shape", [TreeShape.chain(4), TreeShape(8, 4, 2)],
                         ids=["chain4", "tree8"])
@pytest.mark.parametrize("proactive", [True, False], ids=["proactive", "plain"])
@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_greedy_equals_target_only(tiny_pair, tiny_prompts, shape, proactive, version):
    draft, target, tok = tiny_pair
    liveness = Liveness(progress=version == "1.1", silence=2.0)
    for prompt in tiny_prompts[:3]:
        gen, events, _ = run_generation(draft, [FakeVerifier(target)], prompt, 40,
                                        shape=shape, proactive=proactive, liveness=liveness,
                                        eos_ids=eos_ids(tok, target.generation_config))
        assert gen.token_ids == reference(target, tok, prompt, 40)
        s = gen.stats
        assert s.failovers == 0 and len(s.verifiers) == 1
        # 1.1: the first token is the answer to an empty tree (the verifier's prefill),
        # with its own receipt; the draft model bet on it meanwhile.
        assert s.first_token_from_prefill == (version == "1.1")
        plain = 1 if s.first_token_from_prefill else 0
        assert s.rounds == len(gen.receipts) - plain and 0 < s.acceptance < 1
        assert [r.drafted for r in gen.receipts[:plain]] == [0] * plain
        assert (s.first_guess_hit is not None) == (version == "1.1" and proactive)
        assert s.time_to_first_token_ms > 0 and s.inter_token_latency_ms > 0
        if proactive:
            assert s.proactive_bets == s.rounds - 1 or s.proactive_bets == s.rounds
            assert 0 < s.proactive_hits <= s.proactive_bets
        else:
            assert s.proactive_bets == 0
        assert [k for k, _ in events if k != "round"] == ["session"]
        assert sum(i["accepted"] for k, i in events if k == "round") == s.accepted


def test_sampling_equals_target_only(tiny_pair, tiny_prompts):
    draft, target, tok = tiny_pair
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    gen, _, _ = run_generation(draft, [FakeVerifier(target)], tiny_prompts[1], 32,
                               params=params)
    assert gen.token_ids == reference(target, tok, tiny_prompts[1], 32, params)


def covered(gen) -> None:
    """Every generated token is covered by exactly one receipt, in order.

    Walks the receipts: each covers its accepted chain tokens and one bonus token.
    """
    pos = 0
    for kept in gen.receipts:
        _, receipt = open_receipt(kept.receipt_envelope)
        _, req = open_request(kept.request_envelope)
        accepted = list(req.tokens[: receipt.accepted])  # chains: the first ones
        kept = gen.token_ids[pos:pos + receipt.accepted]  # the last round may pass the end
        assert accepted[: len(kept)] == kept
        pos += receipt.accepted + 1
    assert pos >= len(gen.token_ids)
    assert pos - (gen.receipts[-1].accepted + 1) < len(gen.token_ids)


@pytest.mark.parametrize("fault", ["die_at", "stall_at", "refuse_at", "bad_receipt_at"])
def test_failover_keeps_the_output(tiny_pair, tiny_prompts, fault):
    draft, target, tok = tiny_pair
    prompt = tiny_prompts[0]
    first = FakeVerifier(target, **{fault: 3})
    second = FakeVerifier(target)
    gen, events, _ = run_generation(draft, [first, second], prompt, 40,
                                    liveness=Liveness(progress=True, silence=0.5))
    assert gen.token_ids == reference(target, tok, prompt, 40)
    assert gen.stats.failovers == 1
    assert gen.stats.verifiers == [first.peer, second.peer]
    events = [(k, i) for k, i in events if k != "round"]
    assert [k for k, _ in events] == ["session", "failover", "session"]
    assert events[1][1]["verifier"] == first.peer
    # The failed round has no receipt; rounds before it came from the first verifier.
    assert [r.verifier for r in gen.receipts[:2]] == [first.peer] * 2
    assert all(r.verifier == second.peer for r in gen.receipts[2:])
    covered(gen)


def test_refused_open_goes_to_the_next_verifier(tiny_pair, tiny_prompts):
    draft, target, tok = tiny_pair
    busy, free = FakeVerifier(target, refuse_open=True), FakeVerifier(target)
    gen, _, _ = run_generation(draft, [busy, free], tiny_prompts[2], 16)
    assert gen.stats.verifiers == [free.peer] and gen.stats.failovers == 0
    assert gen.token_ids == reference(target, tok, tiny_prompts[2], 16)


def test_tree_capped_to_the_verifiers_budget(tiny_pair, tiny_prompts):
    draft, target, tok = tiny_pair
    gen, _, _ = run_generation(draft, [FakeVerifier(target, max_tree=3)], tiny_prompts[0], 24,
                               shape=TreeShape(8, 4, 2))
    assert gen.token_ids == reference(target, tok, tiny_prompts[0], 24)
    assert all(r.drafted <= 3 for r in gen.receipts)


def test_no_verifier_is_a_clear_error(tiny_pair, tiny_prompts):
    draft, target, _ = tiny_pair
    with pytest.raises(NoVerifierError):
        run_generation(draft, [FakeVerifier(target, refuse_open=True)], tiny_prompts[0], 8)


def test_all_verifiers_dying_ends_in_a_clear_error(tiny_pair, tiny_prompts):
    draft, target, _ = tiny_pair
    with pytest.raises(NoVerifierError, match="no verifier"):
        run_generation(draft, [FakeVerifier(target, die_at=2), FakeVerifier(target, die_at=1)],
                       tiny_prompts[0], 40)


def test_vocabulary_mismatch_is_a_clear_error(tiny_pair, tiny_prompts):
    draft, target, _ = tiny_pair
    with pytest.raises(VocabularyMismatch, match="vocabulary mismatch"):
        run_generation(draft, [FakeVerifier(target, vocab_size=100)], tiny_prompts[0], 8)


def test_a_verifier_with_the_wrong_vocabulary_is_skipped(tiny_pair, tiny_prompts):
    draft, target, tok = tiny_pair
    wrong, right = FakeVerifier(target, vocab_size=100), FakeVerifier(target)
    gen, _, _ = run_generation(draft, [wrong, right], tiny_prompts[0], 16)
    assert gen.stats.verifiers == [right.peer] and gen.stats.failovers == 0
    assert gen.token_ids == reference(target, tok, tiny_prompts[0], 16)


def test_receipts_are_kept_in_the_node_ledger(tiny_pair, tiny_prompts, tmp_path):
    from specedge.ledger import open_ledger

    draft, target, _ = tiny_pair
    identity = create_new_key_pair()
    node = peer_id_of(identity)
    path = tmp_path / "node.sqlite3"
    first, second = FakeVerifier(target, die_at=4), FakeVerifier(target)

    async def main():
        async with receipt_book(path, node) as book, trio.open_nursery() as nursery:
            conn = FakeConnector(nursery, identity, [first, second])
            gen = await generate(draft, tiny_prompts[0], 40, connector=conn,
                                 model_id="tiny-test", book=book)
            nursery.cancel_scope.cancel()
        return gen, book.tally

    gen, tally = trio.run(main)
    with open_ledger(str(path)) as ledger:
        assert ledger.count_receipts() == len(gen.receipts) == tally.stored
        assert ledger.balance(node).balance == sum(r.accepted for r in gen.receipts)
        keys = {(r.verifier, r.session_id, r.seq) for r in ledger.receipts(node=node, limit=None)}
        assert keys == {(r.verifier, r.session_id.hex(), r.seq) for r in gen.receipts}
    assert tally.credit == sum(r.accepted for r in gen.receipts)
    covered(gen)
