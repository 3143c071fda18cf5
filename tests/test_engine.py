"""Greedy speculative output equals the target's own greedy output, token for token.

Float32, many prompts and lengths, chains and trees, drafts from ~0% to 100% acceptance,
proactive drafting on and off, stopping at end-of-sequence.
"""

from __future__ import annotations

import pytest
from support import hf_greedy

from specedge.engine import (
    autoregressive_generate,
    server_only_speculative_generate,
    speculative_generate,
)
from specedge.models import build_tiny
from specedge.trees import TreeShape

SHAPES = [TreeShape.chain(1), TreeShape.chain(4), TreeShape(8, 4, 2), TreeShape(16, 6, 4),
          TreeShape(24, 10, 3)]
# Relative weight noise of the draft: 0 accepts everything, 0.5 almost nothing.
NOISES = [0.0, 0.015, 0.05, 0.5]


@pytest.fixture(scope="module")
def drafts():
    return {noise: build_tiny(draft=True, noise=noise)[0] for noise in NOISES}


@pytest.fixture(scope="module")
def references(tiny_pair, tiny_prompts):
    target, tok = tiny_pair[1], tiny_pair[2]
    eos = [tok.eos_token_id]
    return {i: hf_greedy(target, p, 48, eos) for i, p in enumerate(tiny_prompts)}


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("proactive", [False, True])
def test_greedy_equals_target_only(tiny_pair, tiny_prompts, references, drafts, noise, shape,
                                   proactive):
    target, tok = tiny_pair[1], tiny_pair[2]
    for i, prompt in enumerate(tiny_prompts):
        n = 8 + 5 * i  # many lengths
        gen = speculative_generate(drafts[noise], target, prompt, n, shape=shape,
                                   proactive=proactive, eos_ids=[tok.eos_token_id])
        assert gen.token_ids == references[i][:n], f"prompt {i}"


def test_acceptance_spans_the_draft_qualities(tiny_pair, tiny_prompts, drafts):
    target = tiny_pair[1]
    rates = {}
    for noise in NOISES:
        acc = drafted = 0
        for prompt in tiny_prompts:
            s = speculative_generate(drafts[noise], target, prompt, 32, proactive=False).stats
            acc, drafted = acc + s.accepted, drafted + s.drafted
        rates[noise] = acc / drafted
    assert rates[0.0] == 1.0
    assert 0.4 < rates[0.015] < 0.95
    assert rates[0.5] < 0.15
    assert rates[0.0] > rates[0.015] > rates[0.05] > rates[0.5]


def test_stops_at_end_of_sequence_and_keeps_it(tiny_pair, tiny_prompts, references):
    draft, target = tiny_pair[0], tiny_pair[1]
    for i, prompt in enumerate(tiny_prompts[:4]):
        ref = references[i]
        stop = ref[10]  # pretend this token ends the sequence
        want = ref[: ref.index(stop) + 1]
        for shape in SHAPES[1:3]:
            for proactive in (False, True):
                gen = speculative_generate(draft, target, prompt, 48, shape=shape,
                                           proactive=proactive, eos_ids=[stop])
                assert gen.token_ids == want
        assert autoregressive_generate(target, prompt, 48, eos_ids=[stop]).token_ids == want


def test_stats_add_up(tiny_pair, tiny_prompts):
    draft, target = tiny_pair[0], tiny_pair[1]
    gen = speculative_generate(draft, target, tiny_prompts[0], 40, shape=TreeShape.chain(4))
    s = gen.stats
    assert s.generated == len(gen.token_ids) == 40
    assert s.drafted == 4 * s.rounds
    assert sum(s.accepted_per_position) == s.accepted
    # Every round emits its accepted drafts plus one bonus (the last may be cut at the limit).
    assert s.accepted + s.rounds >= s.generated
    assert s.target_forwards == s.rounds + 1  # plus the prefill
    assert 0 < s.proactive_hits <= s.proactive_bets == s.rounds
    assert s.mean_accepted_length == pytest.approx(s.accepted / s.rounds)


def test_perfect_draft_chain_hits_every_bet(tiny_pair, tiny_prompts, drafts):
    """With draft == target, every whole chain is accepted and every bet wins."""
    target = tiny_pair[1]
    s = speculative_generate(drafts[0.0], target, tiny_prompts[1], 41,
                             shape=TreeShape.chain(4)).stats
    assert s.rounds == 9 and s.proactive_hits == s.proactive_bets - 1 + 1 == s.rounds
    assert s.mean_accepted_length == 4.0


def test_baselines_match_too(tiny_pair, tiny_prompts, references):
    draft, target = tiny_pair[0], tiny_pair[1]
    prompt = tiny_prompts[2]
    assert autoregressive_generate(target, prompt, 30).token_ids == references[2][:30]
    gen = server_only_speculative_generate(draft, target, prompt, 30)
    assert gen.token_ids == references[2][:30] and gen.stats.proactive_bets == 0


def test_streaming_callback_sees_every_token_once(tiny_pair, tiny_prompts):
    draft, target = tiny_pair[0], tiny_pair[1]
    seen: list[int] = []
    gen = speculative_generate(draft, target, tiny_prompts[3], 25, on_tokens=seen.extend)
    assert seen == gen.token_ids


def test_zero_tokens_and_empty_prompt(tiny_pair):
    draft, target = tiny_pair[0], tiny_pair[1]
    assert speculative_generate(draft, target, [5, 6], 0).token_ids == []
    with pytest.raises(ValueError, match="prompt"):
        speculative_generate(draft, target, [], 4)
