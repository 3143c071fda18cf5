"""What the target says at a committed position, and the node's check of a receipt.

`position_facts` turns a verifier's (or an auditor's) logits at committed positions into
what receipts and audit answers carry: the log-probability of the token, its margin in
choice-score space (what `sampling.choose_tokens` takes the argmax of), the requested
top-k log-probabilities, and for an auditor its own choice and the committed token's
deficit. `check_round` is the node's side: it recomputes the acceptance decision from
these facts, its own draft tree and the seed through the one acceptance rule, and
refuses a receipt that contradicts itself. See `protocol.audits` for the fraud rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specedge.acceptance import accept
from specedge.sampling import SamplingParams, choose_tokens, filter_logits, gumbel_noise

SCORE_CAP = 1e4  # an infinite margin or deficit (the runner-up or the token filtered out)
LOGPROB_SLACK = 1e-3  # float32 rounding between the verifier's and the node's arithmetic


@dataclass(frozen=True)
class Facts:
    token: int  # the committed token (receipt) or the auditor's choice (audit answer)
    logprob: float
    margin: float
    deficit: float = 0.0  # audit only: score(choice) - score(committed)
    top_tokens: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


def choice_scores(logits: torch.Tensor, positions: Sequence[int],
                  params: SamplingParams) -> torch.Tensor:
    """What `choose_tokens` maximises, [N, V] float32: the logits when greedy, else the
    filtered logits over temperature plus the seeded Gumbel noise of each position."""
    if params.greedy:
        return logits.float()
    noise = gumbel_noise(params.seed, positions, logits.shape[-1]).to(logits.device)
    return filter_logits(logits, params) + noise


def _cap(x: float) -> float:
    return min(x, SCORE_CAP) if math.isfinite(x) or x > 0 else 0.0


@torch.inference_mode()
def position_facts(logits: torch.Tensor, positions: Sequence[int], params: SamplingParams,
                   committed: Sequence[int], top_k: int = 0) -> list[Facts]:
    """Facts for rows of `logits` [N, V] whose committed tokens are `committed` [N].

    The facts' token is the target's own choice at each row (the one rule:
    `choose_tokens`); a verifier's choice is the committed token, an auditor's may
    differ, and then `deficit` says by how much the committed token trailed it.
    """
    chosen = choose_tokens(logits, positions, params).tolist()
    scores = choice_scores(logits, positions, params)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1) if top_k else None
    out = []
    for i, (choice, token) in enumerate(zip(chosen, committed, strict=True)):
        row = scores[i]
        best = float(row[choice])
        others = row.clone()
        others[choice] = float("-inf")
        margin = _cap(best - float(others.max()))
        deficit = 0.0 if choice == token else _cap(best - float(row[int(token)]))
        out.append(Facts(
            int(choice), float(logprobs[i, choice]), margin, deficit,
            top.indices[i].tolist() if top is not None else [],
            top.values[i].tolist() if top is not None else []))
    return out


class ReceiptContradiction(ValueError):
    """A receipt whose facts contradict its own verdict, the tree or the seed."""


def check_round(tokens: Sequence[int], parents: Sequence[int], accepted: Sequence[int],
                bonus: int, facts: Sequence[Facts], params: SamplingParams,
                first_position: int, top_k: int, vocab_size: int) -> None:
    """Recompute a round's verdict from its receipt's facts; raise ReceiptContradiction.

    The facts name the target's token at the root and at every accepted node; with the
    node's own tree, the one acceptance rule must then yield exactly the claimed path and
    bonus (a verifier cannot stop early while a draft child matched, nor accept a node
    whose parent's choice was another token). Each position's numbers must be possible:
    a log-probability <= 0, a margin >= 0, alternatives sorted, and the chosen token at
    least as good as every alternative listed (greedy: by log-probability; sampling: by
    the seeded choice score, which the node computes itself).
    """
    committed = [int(tokens[i]) for i in accepted] + [int(bonus)]
    if len(facts) != len(committed) or [f.token for f in facts] != committed:
        raise ReceiptContradiction("the receipt's positions are not the committed tokens")
    target = [-1] * (len(tokens) + 1)
    for node, fact in zip([-1, *accepted], facts, strict=True):
        target[node + 1] = fact.token
    if accept(tokens, parents, target) != (list(accepted), int(bonus)):
        raise ReceiptContradiction("the acceptance rule gives another verdict for these "
                                   "choices")
    for offset, fact in enumerate(facts):
        _check_position(fact, params, first_position + offset, top_k, vocab_size)


def _check_position(fact: Facts, params: SamplingParams, position: int, top_k: int,
                    vocab_size: int) -> None:
    values = [fact.logprob, fact.margin, *fact.top_logprobs]
    if not all(math.isfinite(v) for v in values):
        raise ReceiptContradiction("a position's numbers are not finite")
    if fact.logprob > LOGPROB_SLACK or fact.margin < 0:
        raise ReceiptContradiction("a log-probability above 0 or a negative margin")
    if len(fact.top_tokens) != len(fact.top_logprobs) or len(fact.top_tokens) < top_k:
        raise ReceiptContradiction(f"fewer than the {top_k} alternatives asked for")
    tops = fact.top_logprobs
    if any(a < b - LOGPROB_SLACK for a, b in zip(tops, tops[1:], strict=False)):
        raise ReceiptContradiction("alternatives not sorted by log-probability")
    listed = dict(zip(fact.top_tokens, tops, strict=True))
    if fact.token in listed and abs(listed[fact.token] - fact.logprob) > LOGPROB_SLACK:
        raise ReceiptContradiction("the token's log-probability differs from its listing")
    if params.greedy:  # the argmax: no likelier alternative, the margin is the gap
        if any(lp > fact.logprob + LOGPROB_SLACK for t, lp in listed.items() if t != fact.token):
            raise ReceiptContradiction("greedy choice of a token that is not the most likely")
        if len(tops) >= 2 and fact.top_tokens[0] == fact.token and (
                abs(fact.margin - (tops[0] - tops[1])) > 10 * LOGPROB_SLACK):
            raise ReceiptContradiction("the margin is not the gap to the runner-up")
        return
    better = [(t, lp) for t, lp in listed.items() if t != fact.token and lp > fact.logprob]
    if not better:
        return
    # Sampling: filters never drop a token more likely than the chosen one, so each such
    # alternative competed, and its seeded score trails the chosen one's by the margin.
    noise = gumbel_noise(params.seed, [position], vocab_size)[0]
    mine = fact.logprob / params.temperature + float(noise[fact.token])
    slack = LOGPROB_SLACK * (1 + 1 / params.temperature)
    for t, lp in better:
        if lp / params.temperature + float(noise[t]) > mine - fact.margin + slack:
            raise ReceiptContradiction("a listed alternative beats the sampled token")
