"""Speculative sampling follows the target's distribution exactly.

Two checks: (1) with position-keyed noise, speculative sampling reproduces target-only
sampling token for token for the same seed; (2) a chi-square test on a model with a tiny
vocabulary compares the joint distribution of the first two generated tokens with the
target's exact probabilities. Deliberately wrong acceptance rules fail (2), which shows
the test has the power to catch one.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

import specedge.verification as verification
from specedge.acceptance import accept
from specedge.engine import autoregressive_generate, speculative_generate
from specedge.models import TinySpec, build_tiny
from specedge.sampling import SamplingParams, choose_tokens, filter_logits, gumbel_noise
from specedge.trees import TreeShape

VOCAB = 6
PROMPT = [1, 4, 2]
DRAWS = 2500
PARAMS = dict(temperature=1.0)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.0, top_p=0.9, seed=2),
    SamplingParams(temperature=0.6, top_k=20, seed=3),
    SamplingParams(temperature=1.3, top_p=0.8, top_k=50, seed=4),
])
@pytest.mark.parametrize("shape", [TreeShape.chain(3), TreeShape(12, 5, 3)], ids=str)
def test_sampling_reproduces_target_only_sampling(tiny_pair, tiny_prompts, params, shape):
    draft, target = tiny_pair[0], tiny_pair[1]
    for prompt in tiny_prompts[:4]:
        ref = autoregressive_generate(target, prompt, 30, params).token_ids
        gen = speculative_generate(draft, target, prompt, 30, params, shape)
        assert gen.token_ids == ref


def test_seeds_change_samples_and_greedy_ignores_them(tiny_pair, tiny_prompts):
    target = tiny_pair[1]
    outs = {tuple(autoregressive_generate(target, tiny_prompts[0], 12,
                                          SamplingParams(1.0, seed=s)).token_ids)
            for s in range(5)}
    assert len(outs) > 1
    g = {tuple(autoregressive_generate(target, tiny_prompts[0], 12,
                                       SamplingParams(0.0, seed=s)).token_ids) for s in range(3)}
    assert len(g) == 1


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    kept = lambda p: torch.isfinite(filter_logits(logits, p))[0].tolist()  # noqa: E731
    assert kept(SamplingParams(1.0, top_k=2)) == [True, True, False, False, False]
    # softmax mass: .64 .23 .09 .03 .01 -> top_p .8 keeps two, .9 keeps three
    assert kept(SamplingParams(1.0, top_p=0.8)) == [True, True, False, False, False]
    assert kept(SamplingParams(1.0, top_p=0.9)) == [True, True, True, False, False]
    assert kept(SamplingParams(1.0, top_p=0.01)) == [True, False, False, False, False]


def test_noise_is_keyed_by_seed_and_position():
    a = gumbel_noise(7, [3, 4], 50)
    assert torch.equal(a, gumbel_noise(7, [3, 4], 50))
    assert torch.equal(a[1], gumbel_noise(7, [4], 50)[0])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, gumbel_noise(8, [3, 4], 50))


def test_gumbel_max_samples_the_softmax():
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0]]).repeat(4000, 1)
    picks = choose_tokens(logits, list(range(4000)), SamplingParams(1.0, seed=11))
    counts = torch.bincount(picks, minlength=4).double()
    expected = torch.softmax(logits[0], -1).double() * 4000
    assert chisquare(counts, expected).pvalue > 1e-4


@pytest.mark.parametrize("bad", [(0.0, 1.0, 0, 0), (-1.0, 1.0, 0, 0), (1.0, 0.0, 0, 0),
                                 (1.0, 1.5, 0, 0), (1.0, 1.0, -1, 0), (1.0, 1.0, 0, -5)])
def test_bad_parameters_are_refused(bad):
    params = SamplingParams(*bad)
    if bad[0] == 0.0:
        params.check()  # greedy is fine
        return
    with pytest.raises(ValueError):
        params.check()


# -- the statistical test -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vocab_pair():
    spec = TinySpec(hidden=32, layers=2, heads=2, kv_heads=1, ffn=64, positions=64)
    target, _ = build_tiny(spec=spec, vocab_size=VOCAB)
    # An independent draft (other seed): low acceptance, so rejections are exercised.
    draft, _ = build_tiny(spec=spec, vocab_size=VOCAB, seed=99)
    return draft, target


def exact_two_token_distribution(target) -> torch.Tensor:
    """P(first two generated tokens) [VOCAB * VOCAB] under the target alone."""
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([PROMPT])).logits[0, -1].double(), -1)
        out = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
        for a in range(VOCAB):
            p2 = torch.softmax(target(torch.tensor([PROMPT + [a]])).logits[0, -1].double(), -1)
            out[a] = p1[a] * p2
    return out.flatten()


def sampled_two_token_counts(draft, target) -> torch.Tensor:
    counts = torch.zeros(VOCAB * VOCAB, dtype=torch.float64)
    shapes = itertools.cycle([TreeShape.chain(2), TreeShape(4, 2, 2), TreeShape(3, 3, 1)])
    for seed in range(DRAWS):
        gen = speculative_generate(draft, target, PROMPT, 2, SamplingParams(seed=seed, **PARAMS),
                                   next(shapes), proactive=False)
        a, b = gen.token_ids
        counts[a * VOCAB + b] += 1
    return counts


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    # Pool cells too rare for the chi-square approximation into one.
    rare = expected < 5
    obs = torch.cat([counts[~rare], counts[rare].sum()[None]])
    exp = torch.cat([expected[~rare], expected[rare].sum()[None]])
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def lenient_accept(tokens, parents, target_tokens):
    """WRONG: trusts the draft, accepting the first child wherever the target disagrees."""
    path, node = [], -1
    while True:
        kids = [i for i, p in enumerate(parents) if p == node]
        match = [k for k in kids if tokens[k] == target_tokens[node + 1]]
        if not kids:
            return path, int(target_tokens[node + 1])
        node = (match or kids)[0]
        path.append(node)


def off_by_one_accept(tokens, parents, target_tokens):
    """WRONG: compares a child with the target's choice at the child, not at its parent."""
    path, node = [], -1
    while True:
        nxt = next((k for k, p in enumerate(parents)
                    if p == node and tokens[k] == target_tokens[k + 1]), None)
        if nxt is None:
            return path, int(target_tokens[node + 1])
        path.append(nxt)
        node = nxt


def test_first_tokens_follow_the_target_distribution(tiny_vocab_pair):
    draft, target = tiny_vocab_pair
    probs = exact_two_token_distribution(target)
    counts = sampled_two_token_counts(draft, target)
    assert chi_square_pvalue(counts, probs) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("wrong_rule", [lenient_accept, off_by_one_accept])
def test_a_wrong_rule_fails_the_distribution_test(tiny_vocab_pair, monkeypatch, wrong_rule):
    draft, target = tiny_vocab_pair
    probs = exact_two_token_distribution(target)
    monkeypatch.setattr(verification, "accept", wrong_rule)
    counts = sampled_two_token_counts(draft, target)
    assert chi_square_pvalue(counts, probs) < 1e-6
    monkeypatch.setattr(verification, "accept", accept)
