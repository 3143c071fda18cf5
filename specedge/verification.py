"""The target side of one session: prefill, verify a tree, keep the accepted path.

The verifier daemon batches many sessions into one forward pass; it reuses the pieces
here (`forward_inputs`, `choice_positions`, `choose_tokens`, `accept`). `TargetSession`
is the one-session version the in-process engine and the benchmarks call directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from specedge import kvcache
from specedge.acceptance import accept
from specedge.audit import position_facts
from specedge.sampling import SamplingParams, choose_tokens
from specedge.trees import depths, tree_mask, tree_positions, with_root


@dataclass(frozen=True)
class Verdict:
    accepted: list[int]  # draft node indices, root to leaf
    bonus: int
    accepted_tokens: list[int]
    # What the target said at each committed position (specedge.audit.Facts), for the
    # receipt; filled by the verifier's engine.
    facts: list = field(default_factory=list)

    @property
    def new_tokens(self) -> list[int]:
        """Tokens the round commits: the accepted drafts, then the bonus."""
        return [*self.accepted_tokens, self.bonus]


def forward_inputs(
    pending: int, tokens: Sequence[int], parents: Sequence[int], prefix_len: int,
    dtype: torch.dtype,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Input ids, position ids [1, n+1] and mask [1, 1, n+1, prefix+n+1] for one tree.

    The pending token (committed but not yet in the target's cache) is node 0.
    """
    full = with_root(parents)
    ids = [pending, *tokens]
    return ids, tree_positions(full, prefix_len), tree_mask(full, prefix_len, dtype=dtype)


def choice_positions(parents: Sequence[int], prefix_len: int) -> list[int]:
    """Absolute index of the token the target chooses after each node (root first)."""
    return [prefix_len + d + 1 for d in depths(with_root(parents))]


def kept_rows(prefix_len: int, accepted: Sequence[int]) -> list[int]:
    """Cache rows to keep after a round: the prefix, the root, the accepted nodes."""
    return [*range(prefix_len + 1), *(prefix_len + 1 + n for n in accepted)]


class TargetSession:
    """One generation's target-model state: the KV cache of everything committed but the
    pending last token, which every verification forwards as the tree's root."""

    def __init__(self, model: PreTrainedModel, prompt: Sequence[int],
                 params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("a session needs at least one prompt token")
        self.model = model
        self.params = params
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = DynamicCache()
        self.tokens: list[int] = list(prompt)  # committed, pending last
        self.forwards = 0
        self.top_logprobs = 0  # alternatives listed in each committed position's facts
        self._prefilled = False

    @property
    def prefix_len(self) -> int:
        return len(self.tokens) - 1

    @torch.inference_mode()
    def prefill(self, chunk: int = 512) -> None:
        """Forward every committed token but the pending one, `chunk` tokens at a time."""
        have = kvcache.cache_len(self.cache)
        while have < self.prefix_len:
            ids = self.tokens[have : min(have + chunk, self.prefix_len)]
            self.model(
                input_ids=torch.tensor([ids], device=self.device),
                position_ids=torch.arange(have, have + len(ids), device=self.device)[None],
                past_key_values=self.cache,
                use_cache=True,
            )
            self.forwards += 1
            have += len(ids)
        self._prefilled = True

    @torch.inference_mode()
    def verify(self, tokens: Sequence[int], parents: Sequence[int]) -> Verdict:
        """Run the tree through the target, accept the longest matching path, commit it."""
        if not self._prefilled:
            self.prefill()
        prefix = self.prefix_len
        ids, positions, mask = forward_inputs(self.tokens[-1], tokens, parents, prefix, self.dtype)
        logits = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=positions.to(self.device),
            attention_mask=mask.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
        ).logits[0]  # [n + 1, V]
        self.forwards += 1
        where = choice_positions(parents, prefix)
        chosen = choose_tokens(logits, where, self.params).tolist()
        path, bonus = accept(tokens, parents, chosen)
        kvcache.keep_rows(self.cache, kept_rows(prefix, path))
        keep = [0, *(n + 1 for n in path)]
        accepted = [int(tokens[n]) for n in path]
        facts = position_facts(logits[keep], [where[k] for k in keep], self.params,
                               [*accepted, bonus], self.top_logprobs)
        verdict = Verdict(path, bonus, accepted, facts)
        self.tokens.extend(verdict.new_tokens)
        return verdict
