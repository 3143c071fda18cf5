"""Choosing the target's token at a position: greedy, or a seeded sample.

Sampling uses the Gumbel-max trick with noise keyed by (seed, absolute position). The
token chosen at a position is then a pure function of the seed, the position and the
target's logits there, so speculative decoding, target-only decoding and a generation
that failed over to another verifier all produce the same tokens for the same seed, and
each token is an exact sample from the filtered target distribution.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def check(self) -> None:
        """Raise ValueError for parameters no sampler could honour."""
        if not (self.temperature >= 0.0 and self.temperature <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 <= self.seed < 2**64):
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to logits [N, V]; filtered entries become -inf."""
    scaled = logits.float() / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def _position_seed(seed: int, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def gumbel_noise(seed: int, positions: Sequence[int], vocab: int) -> torch.Tensor:
    """Standard Gumbel noise [N, V], one independent row per absolute position."""
    rows = []
    for pos in positions:
        gen = torch.Generator().manual_seed(_position_seed(seed, pos))
        u = torch.rand(vocab, generator=gen, dtype=torch.float64)
        rows.append(-torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-16))))
    return torch.stack(rows).float()


def choose_tokens(
    logits: torch.Tensor, positions: Sequence[int], params: SamplingParams
) -> torch.Tensor:
    """The target's token for each row of logits [N, V] -> [N] (long, on logits' device).

    `positions[i]` is the absolute index in the sequence where row i's token will sit.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits, params)
    noise = gumbel_noise(params.seed, positions, logits.shape[-1]).to(filtered.device)
    return (filtered + noise).argmax(dim=-1)
