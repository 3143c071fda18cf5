"""The llama.cpp verifier engine against llama.cpp's own greedy decoding of the same GGUF.

The tiny-test target is written as a float32 GGUF (no download). Speculative output
through `LlamaEngine` (chains and branching trees, several sessions in one pass, prefill
chunks in the same pass as other sessions' trees) must equal what llama.cpp decodes
greedily one token at a time. llama.cpp may sum in another order when a batch holds other
rows, so a near-tie could flip; the test reports every divergence with its margin and
fails unless it is such a near-tie (none were seen with this model).
"""

from __future__ import annotations

import random

import pytest

from specedge.llama import unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

# Logit gap below which a flip by summation order counts as a near-tie, not a bug.
NEAR_TIE = 1e-3
PROMPTS = [[5, 17, 99, 3], [200, 201, 202, 203, 204, 205, 206] * 11, [42], [7, 7, 7, 100, 12]]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    from specedge.ggufs import tiny_gguf
    from specedge.models import TINY_TARGET

    return tiny_gguf(TINY_TARGET, tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def model(gguf):
    from specedge.llama import LlamaModel

    m = LlamaModel(gguf)
    yield m
    m.close()


@pytest.fixture(scope="module")
def reference(model):
    from specedge.llama import greedy_decode

    return {i: greedy_decode(model, p, 60, threads=1) for i, p in enumerate(PROMPTS)}


def engine_for(model, **kw):
    from specedge.verifier.llama_engine import LlamaEngine

    kw.setdefault("prefill_chunk", 16)
    return LlamaEngine(model, max_batch_tokens=256, n_ctx=2048, threads=1, **kw)


def random_tree(rng: random.Random, truth: list[int], vocab: int) -> tuple[list[int], list[int]]:
    """A tree whose first branch follows `truth` (the target's next tokens) for a random
    length, with wrong siblings and wrong branches around it."""
    tokens: list[int] = []
    parents: list[int] = []
    node, depth = -1, 0
    good = rng.randint(0, min(len(truth), 6))
    while depth < good:
        for _ in range(rng.randint(0, 2)):  # wrong siblings before the right child
            tokens.append((truth[depth] + rng.randint(1, vocab - 1)) % vocab)
            parents.append(node)
        tokens.append(truth[depth])
        parents.append(node)
        node = len(tokens) - 1
        depth += 1
    for _ in range(rng.randint(0, 4)):  # wrong branches anywhere
        tokens.append(rng.randrange(vocab))
        parents.append(rng.randint(-1, len(tokens) - 2))
    return tokens, parents


def test_weights_load_as_written(model):
    assert model.weight_type == "F32"
    assert model.n_vocab == 259


def test_speculative_output_equals_llama_greedy_over_trees_and_sessions(model, reference):
    from specedge.sampling import SamplingParams
    from specedge.verifier.llama_engine import PrefillJob, VerifyJob

    rng = random.Random(3)
    engine = engine_for(model)
    states = {}
    done: dict[int, list[int]] = {}
    flips = []
    steps = 0
    while len(done) < len(PROMPTS):
        steps += 1
        if steps < len(PROMPTS) + 1 and steps - 1 not in states:  # sessions start staggered
            i = steps - 1
            states[i] = engine.new_state(PROMPTS[i], SamplingParams(), max_new_tokens=80)
        jobs = []
        for i, state in states.items():
            if i in done:
                continue
            job = engine.next_prefill(state)
            if job is None:
                want, _ = reference[i]
                produced = len(state.tokens) - len(PROMPTS[i])
                job = VerifyJob(state, *random_tree(rng, want[produced:], model.n_vocab))
            jobs.append(job)
        result = engine.run(jobs)
        for job, verdict in zip(jobs, result.verdicts, strict=True):
            if isinstance(job, PrefillJob):
                assert verdict is None
                continue
            i = next(k for k, s in states.items() if s is job.state)
            want, margins = reference[i]
            got = job.state.tokens[len(PROMPTS[i]):]
            n = min(len(got), len(want))
            if got[:n] != want[:n]:
                at = next(k for k in range(n) if got[k] != want[k])
                flips.append((i, at, margins[at]))
                done[i] = got
            elif len(got) >= len(want):
                done[i] = got[: len(want)]
    print(f"{steps} passes; divergences (session, token, margin): {flips or 'none'}")
    assert all(m < NEAR_TIE for _i, _at, m in flips), flips
    assert not flips or len(flips) < len(PROMPTS)
    for i, got in done.items():
        if not any(f[0] == i for f in flips):
            assert got == reference[i][0]


def test_only_the_accepted_path_stays_in_the_cache(model):
    from specedge.sampling import SamplingParams
    from specedge.verifier.llama_engine import VerifyJob

    engine = engine_for(model)
    state = engine.new_state([5, 6, 7, 8, 9], SamplingParams(), max_new_tokens=40)
    while (job := engine.next_prefill(state)) is not None:
        engine.run([job])
    assert engine.ctx.seq_len(state.seq) == 4
    # A bushy tree of wrong guesses: only the root (the pending token) is kept.
    tokens = [250, 251, 252, 253, 254, 255]
    verdict = engine.run([VerifyJob(state, tokens, [-1, -1, 0, 0, 1, -1])]).verdicts[0]
    if not verdict.accepted:
        assert engine.ctx.seq_len(state.seq) == 5 == state.cached == state.prefix_len
    free = len(engine._free_temps)
    assert free == engine.max_leaves  # every temporary sequence went back
    for temp in range(engine.session_slots, engine.ctx.n_seq_max):
        assert engine.ctx.seq_len(temp) == 0
    engine.release(state)
    assert engine.ctx.seq_len(state.seq if state.seq >= 0 else 0) == 0
    assert engine.reserved == 0


def test_a_failed_pass_changes_no_session(model):
    from specedge.llama import LlamaError
    from specedge.sampling import SamplingParams
    from specedge.verifier.llama_engine import VerifyJob

    engine = engine_for(model)
    a = engine.new_state([1, 2, 3, 4], SamplingParams(), max_new_tokens=20)
    b = engine.new_state([9, 8, 7], SamplingParams(), max_new_tokens=20)
    for s in (a, b):
        while (job := engine.next_prefill(s)) is not None:
            engine.run([job])
    before = [(list(s.tokens), s.cached) for s in (a, b)]
    with pytest.raises(LlamaError):  # a token id outside the vocabulary: llama.cpp refuses
        engine.run([VerifyJob(a, [3, 4], [-1, 0]), VerifyJob(b, [10**6], [-1])])
    assert [(s.tokens, s.cached) for s in (a, b)] == before
    assert [engine.ctx.seq_len(s.seq) for s in (a, b)] == [3, 2]
    assert len(engine._free_temps) == engine.max_leaves
    verdict = engine.run([VerifyJob(a, [3], [-1])]).verdicts[0]  # and it still serves
    assert verdict is not None


def test_admission_by_cells(model):
    from specedge.kvblocks import MemoryFull
    from specedge.sampling import SamplingParams

    engine = engine_for(model)
    big = engine.new_state([1] * 10, SamplingParams(), max_new_tokens=1500)
    with pytest.raises(MemoryFull):
        engine.new_state([1] * 10, SamplingParams(), max_new_tokens=1000)
    engine.release(big)
    engine.release(engine.new_state([1] * 10, SamplingParams(), max_new_tokens=1000))


def test_engine_choice_by_measurement(tmp_path, monkeypatch, caplog):
    import argparse
    import logging

    from specedge.verifier import engines

    monkeypatch.setenv("SPECEDGE_CACHE", str(tmp_path))  # the tiny GGUF is written here
    args = argparse.Namespace(
        engine="auto", dtype="float32", model="tiny-test", device="cpu", prefill_chunk=64,
        max_batch_tokens=256, kv_cache_gb=0.01, threads=1, verbose=0, model_id=None,
        no_prefix_cache=True, kv_host_gb=0.0, kv_disk_dir=None, kv_disk_gb=1.0)
    with caplog.at_level(logging.INFO, logger="specedge.verifier"):
        engine = engines.build(args)
    chose = next(r.getMessage() for r in caplog.records if "chose" in r.getMessage())
    print(chose)
    # Both engines were measured; the one kept is the faster by 5+16-row passes.
    assert "torch/float32: 1 rows" in chose and "llama.cpp/F32: 1 rows" in chose
    assert chose.startswith(f"chose {engine.name},")
    assert sorted(engine.pass_costs) == [1, 5, 16]
    assert all(s > 0 for s in engine.pass_costs.values())


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory):
    from specedge.ggufs import tiny_gguf
    from specedge.llama import LlamaModel
    from specedge.models import TINY_DRAFT

    m = LlamaModel(tiny_gguf(TINY_DRAFT, tmp_path_factory.mktemp("gguf-draft")))
    yield m
    m.close()


def speculative(drafter, engine, prompt: list[int], n: int) -> tuple[list[int], dict]:
    """The node's loop in one process: draft, bet, verify, adopt or commit."""
    from specedge.sampling import SamplingParams
    from specedge.verifier.llama_engine import VerifyJob

    state = engine.new_state(prompt, SamplingParams(), max_new_tokens=n + 70)
    while (job := engine.next_prefill(state)) is not None:
        engine.run([job])
    tree, stats = None, {"rounds": 0, "accepted": 0, "hits": 0}
    while len(state.tokens) - len(prompt) < n:
        if tree is None:
            tree = drafter.draft(list(state.tokens))
        bet = drafter.bet(tree)
        verdict = engine.run([VerifyJob(state, tree.tokens, tree.parents)]).verdicts[0]
        stats["rounds"] += 1
        stats["accepted"] += len(verdict.accepted)
        if bet is not None and bet.hit(verdict.accepted, verdict.bonus):
            stats["hits"] += 1
            tree = drafter.adopt(bet)
        else:
            drafter.commit(tree, verdict.accepted)
            tree = None
    return state.tokens[len(prompt):][:n], stats


@pytest.mark.parametrize("shape", ["chain:4", "tree:8,4,2"])
def test_llama_drafter_chains_trees_and_bets_keep_the_output(model, draft_model, reference,
                                                             shape):
    from specedge.llama_drafter import LlamaDrafter
    from specedge.trees import TreeShape

    engine = engine_for(model)
    drafter = LlamaDrafter(draft_model, TreeShape.parse(shape), n_ctx=1024, threads=1)
    for i in (0, 1):
        want = reference[i][0]
        got, stats = speculative(drafter, engine, PROMPTS[i], len(want))
        print(shape, stats)
        assert got == want
        assert stats["accepted"] > 0 and stats["hits"] > 0  # drafts and bets do land
        drafter.close()
        drafter = LlamaDrafter(draft_model, TreeShape.parse(shape), n_ctx=1024, threads=1)


def test_llama_drafter_chain_is_the_draft_models_greedy_continuation(draft_model):
    from specedge.llama import greedy_decode
    from specedge.llama_drafter import LlamaDrafter
    from specedge.trees import TreeShape

    prompt = [5, 17, 99, 3]
    want, _ = greedy_decode(draft_model, prompt, 6, threads=1)
    drafter = LlamaDrafter(draft_model, TreeShape.chain(6), n_ctx=512, threads=1)
    tree = drafter.draft(prompt)
    assert tree.tokens == want and tree.parents == [-1, 0, 1, 2, 3, 4]
    drafter.commit(tree, [0, 1])  # two accepted: the next draft continues from them
    tree = drafter.draft([*prompt, *want[:2], want[2]])
    assert tree.tokens[:3] == want[3:6]
    free = len(drafter.shared.free)
    drafter.commit(tree, [])
    assert len(drafter.shared.free) == free + len(tree) - 1  # the forwarded nodes' sequences


def test_verdicts_carry_the_facts_receipts_sign(model, reference):
    """Receipts from a llama.cpp verifier carry what the node re-checks: per committed
    position the token, its log-probability, its margin and the requested top-k."""
    from specedge.audit import check_round
    from specedge.sampling import SamplingParams
    from specedge.verifier.llama_engine import VerifyJob

    engine = engine_for(model)
    state = engine.new_state(PROMPTS[0], SamplingParams(), max_new_tokens=20)
    state.top_logprobs = 3
    while (job := engine.next_prefill(state)) is not None:
        engine.run([job])
    want, _ = reference[0]
    tokens, parents = want[:3] + [(want[3] + 1) % model.n_vocab], [-1, 0, 1, 2]
    verdict = engine.run([VerifyJob(state, tokens, parents)]).verdicts[0]
    assert verdict.accepted == [0, 1, 2] and verdict.bonus == want[3]
    facts = verdict.facts
    assert [f.token for f in facts] == want[:4]
    assert all(f.logprob <= 0 and f.margin >= 0 for f in facts)
    assert all(len(f.top_tokens) == 3 and f.top_tokens[0] == f.token for f in facts)
    check_round(tokens, parents, verdict.accepted, verdict.bonus, facts, SamplingParams(),
                len(PROMPTS[0]), 3, model.n_vocab)  # raises when the receipt contradicts itself
    engine.release(state)


def test_audits_replay_the_transcript_on_llama(model, reference):
    """An auditor on llama.cpp finds the target's own choice at every committed position:
    an honest transcript trails by nothing, a bent token is named with its deficit."""
    from specedge.sampling import SamplingParams

    engine = engine_for(model)
    want, _ = reference[1]
    honest = engine.audit_facts(PROMPTS[1], want[:40], SamplingParams())
    assert [f.token for f in honest] == want[:40]
    assert all(f.deficit == 0 for f in honest)
    bent = list(want[:40])
    bent[25] = (bent[25] + 1) % model.n_vocab
    facts = engine.audit_facts(PROMPTS[1], bent, SamplingParams())
    assert facts[25].token == want[25] and facts[25].deficit > 0
    assert engine.reserved == 0  # the replay's cells are given back
