"""In-process generation: speculative (the network's reference), autoregressive, and
server-only speculative, sharing one stopping rule and one statistics record."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from specedge.costs import CostCurve
from specedge.drafter import BETS, Bet, Bets, Drafter
from specedge.sampling import SamplingParams, choose_tokens
from specedge.trees import TreeShape
from specedge.verification import TargetSession

OnTokens = Callable[[list[int]], None]
GREEDY = SamplingParams()
DEFAULT_SHAPE = TreeShape.chain(4)


@dataclass
class GenerationStats:
    rounds: int = 0
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens the target accepted
    proactive_hits: int = 0
    proactive_bets: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    generated: int = 0
    wall_s: float = 0.0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Accepted draft tokens per round, bonus excluded."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def proactive_hit_rate(self) -> float:
        return self.proactive_hits / self.proactive_bets if self.proactive_bets else 0.0

    def record_round(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        while len(self.accepted_per_position) < accepted:
            self.accepted_per_position.append(0)
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(
            acceptance=round(self.acceptance, 4),
            mean_accepted_length=round(self.mean_accepted_length, 4),
            proactive_hit_rate=round(self.proactive_hit_rate, 4),
            target_forwards_per_token=round(self.target_forwards / max(self.generated, 1), 4),
        )
        return out


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens only
    stats: GenerationStats


class Output:
    """Collects generated tokens and applies the stopping rule: end-of-sequence (kept, as
    Hugging Face does) or the token limit."""

    def __init__(self, max_new_tokens: int, eos_ids: Sequence[int],
                 on_tokens: OnTokens | None) -> None:
        self.max_new_tokens = max_new_tokens
        self.eos = set(eos_ids)
        self.on_tokens = on_tokens
        self.tokens: list[int] = []
        self.done = max_new_tokens <= 0

    def extend(self, new: Sequence[int]) -> list[int]:
        """Take tokens up to the stop; return the ones taken."""
        taken: list[int] = []
        for tok in new:
            if self.done:
                break
            taken.append(int(tok))
            self.done = int(tok) in self.eos or len(self.tokens) + len(taken) >= self.max_new_tokens
        self.tokens.extend(taken)
        if taken and self.on_tokens is not None:
            self.on_tokens(taken)
        return taken


def speculative_generate(
    draft_model: PreTrainedModel,
    target_model: PreTrainedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams = GREEDY,
    shape: TreeShape = DEFAULT_SHAPE,
    proactive: bool = True,
    eos_ids: Sequence[int] = (),
    on_tokens: OnTokens | None = None,
    cost: CostCurve | None = None,
    bets: int = BETS,
) -> Generation:
    """Draft trees with `draft_model`, verify them with `target_model`, in one process.

    With `proactive`, each round also bets on the `bets` likeliest verdicts and drafts
    the next tree for each before verifying (the network node does this while the
    request is in flight). `cost`: the target's pass cost by rows, which a dynamic
    `shape` is sized against.
    """
    params.check()
    start = time.perf_counter()
    stats = GenerationStats()
    out = Output(max_new_tokens, eos_ids, on_tokens)
    drafter = Drafter(draft_model, shape)
    drafter.cost, drafter.bets = cost, bets
    target = TargetSession(target_model, prompt_ids, params)
    target.prefill()
    tree = None
    while not out.done:
        if tree is None:
            tree = drafter.draft(target.tokens)
        bet: Bet | Bets | None = drafter.bet(tree) if proactive else None
        verdict = target.verify(tree.tokens, tree.parents)
        stats.record_round(len(tree), len(verdict.accepted))
        out.extend(verdict.new_tokens)
        if bet is not None:
            stats.proactive_bets += 1
        if bet is not None and bet.hit(verdict.accepted, verdict.bonus):
            stats.proactive_hits += 1
            tree = drafter.adopt(bet)
        else:
            drafter.commit(tree, verdict.accepted)
            tree = None
    stats.target_forwards = target.forwards
    stats.draft_forwards = drafter.counter.forwards
    stats.generated = len(out.tokens)
    stats.wall_s = time.perf_counter() - start
    return Generation(out.tokens, stats)


def server_only_speculative_generate(
    draft_model: PreTrainedModel,
    target_model: PreTrainedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams = GREEDY,
    shape: TreeShape = DEFAULT_SHAPE,
    eos_ids: Sequence[int] = (),
    on_tokens: OnTokens | None = None,
) -> Generation:
    """The baseline SpecEdge is measured against: draft and target share the server, so
    drafting and verifying take turns on one device and there is nothing to overlap a
    proactive draft with."""
    return speculative_generate(draft_model, target_model, prompt_ids, max_new_tokens, params,
                                shape, proactive=False, eos_ids=eos_ids, on_tokens=on_tokens)


@torch.inference_mode()
def autoregressive_generate(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams = GREEDY,
    eos_ids: Sequence[int] = (),
    on_tokens: OnTokens | None = None,
) -> Generation:
    """One target forward per token, with the same token choice as the verifier."""
    params.check()
    if not prompt_ids:
        raise ValueError("a generation needs at least one prompt token")
    start = time.perf_counter()
    stats = GenerationStats()
    out = Output(max_new_tokens, eos_ids, on_tokens)
    device = next(model.parameters()).device
    cache = DynamicCache()
    ids = list(prompt_ids)
    new = ids
    while not out.done:
        pos = len(ids) - len(new)
        logits = model(
            input_ids=torch.tensor([new], device=device),
            position_ids=torch.arange(pos, len(ids), device=device)[None],
            past_key_values=cache,
            use_cache=True,
        ).logits[0, -1:]
        stats.target_forwards += 1
        tok = int(choose_tokens(logits, [len(ids)], params)[0])
        out.extend([tok])
        ids.append(tok)
        new = [tok]
    stats.generated = len(out.tokens)
    stats.wall_s = time.perf_counter() - start
    return Generation(out.tokens, stats)
