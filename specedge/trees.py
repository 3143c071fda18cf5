"""Token trees: their shape, attention masks and positions.

A tree holds draft tokens only. `parents[i] == -1` means node i hangs off the tree's root:
the last token of the cached prefix (on the drafter) or the session's pending token (on
the verifier, which prepends it as node 0 of the forward pass). Nodes are stored in an
order where every parent comes before its children, so a tree can be forwarded in one pass
or grown in batches appended to a KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specedge.treeshape import (  # noqa: F401  (their old home: re-exported)
    DEFAULT_TREE,
    DYNAMIC_DEPTH,
    DYNAMIC_WIDTH,
    TreeShape,
)


@dataclass
class TokenTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    # Cumulative draft log-probability of the path ending at each node.
    logprobs: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, logprob: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.logprobs.append(logprob)
        return len(self.tokens) - 1

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` (empty for -1)."""
        out = []
        while node != -1:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def leaves(self) -> list[int]:
        has_child = set(self.parents)
        return [i for i in range(len(self)) if i not in has_child]


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node; a child of the root (parent -1) has depth 0."""
    out: list[int] = []
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"node {i} has parent {p}: parents must point strictly backwards")
        out.append(0 if p == -1 else out[p] + 1)
    return out


def ancestor_matrix(parents: Sequence[int]) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True when j is i itself or one of its ancestors."""
    n = len(parents)
    anc = torch.zeros((n, n), dtype=torch.bool)
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"node {i} has parent {p}: parents must point strictly backwards")
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    return anc


def tree_mask(
    parents: Sequence[int],
    prefix_len: int,
    start: int = 0,
    stop: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention mask [1, 1, stop - start, prefix_len + stop] for nodes start..stop.

    The KV cache holds the prefix and then nodes 0..start-1 in index order; this forward
    appends nodes start..stop-1. Each node sees the whole prefix, its ancestors and itself.
    """
    stop = len(parents) if stop is None else stop
    allowed = torch.ones((stop - start, prefix_len + stop), dtype=torch.bool)
    allowed[:, prefix_len:] = ancestor_matrix(parents[:stop])[start:stop]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def tree_positions(parents: Sequence[int], prefix_len: int, start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
    """Position ids [1, stop - start]: prefix length + depth."""
    d = depths(parents)
    stop = len(parents) if stop is None else stop
    return torch.tensor([[prefix_len + x for x in d[start:stop]]], dtype=torch.long)


def with_root(parents: Sequence[int]) -> list[int]:
    """Parents of the verifier's forward pass: the pending root as node 0, drafts shifted by one."""
    return [-1] + [p + 1 for p in parents]
