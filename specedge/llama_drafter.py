"""The draft side on llama.cpp: the same trees, commits and bets as `specedge.drafter`.

One llama.cpp context per generation. The committed sequence lives in a "main" sequence
id; every tree node gets a sequence of its own, a copy of its parent's (free in a unified
KV memory: cells just gain an id), so a node decoded with its own sequence attends to
exactly the prefix, its ancestors and itself: tree attention without a mask, and a tree
can grow batch by batch. `commit` copies the accepted nodes' cells into the main
sequence and drops every node sequence. A bet drafts on a copy as well: its main sequence
is a copy of the guessed path's node sequence, in the same context, so a hit is adopted
by switching sequence ids and a miss costs the work and nothing else.

Tree growth (best-first by cumulative log-probability, budget, depth and width limits)
is `specedge.drafter.Growth`, shared with the torch drafter, so both draft the same trees
from the same distributions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from specedge.drafter import Bet, ForwardCounter, Growth
from specedge.llama import LlamaContext, LlamaModel
from specedge.trees import TokenTree, TreeShape


@dataclass
class _Shared:
    """What a drafter and its bets share: the context and its free sequence ids."""

    ctx: LlamaContext
    free: list[int]
    counter: ForwardCounter = field(default_factory=ForwardCounter)

    def take(self) -> int:
        if not self.free:
            raise RuntimeError("the draft context has no free sequence left (tree too big)")
        return self.free.pop()

    def drop(self, seq: int) -> None:
        self.ctx.seq_rm(seq)
        self.free.append(seq)


class LlamaDrafter:
    """Draft model state for one generation on llama.cpp (one caller at a time)."""

    def __init__(self, model: LlamaModel, shape: TreeShape, n_ctx: int = 4096,
                 threads: int | None = None, _shared: _Shared | None = None,
                 _main: int | None = None) -> None:
        self.model = model
        self.shape = shape
        if _shared is None:
            ctx = LlamaContext(model, n_ctx, n_batch=max(512, shape.budget + 1),
                               threads=threads)
            _shared = _Shared(ctx, list(range(ctx.n_seq_max - 1, -1, -1)))
        self.shared = _shared
        self.counter = _shared.counter
        self.main = _shared.take() if _main is None else _main
        self.seq: list[int] = []  # tokens whose KV cells the main sequence holds
        self.growth: Growth | None = None
        self.nodes: dict[int, int] = {}  # tree node -> its sequence
        self.bets: list[LlamaDrafter] = []
        self.restored = 0  # no prefix store on this engine

    @property
    def ctx(self) -> LlamaContext:
        return self.shared.ctx

    # -- forward passes -------------------------------------------------------------

    def _forward(self, tokens: list[int], positions: list[int],
                 seqs: list[int]) -> torch.Tensor:
        out = self.ctx.decode(tokens, positions, [[s] for s in seqs], [True] * len(tokens))
        self.counter.forwards += 1
        return torch.from_numpy(out)  # [len(tokens), V]

    def _extend(self, sequence: list[int]) -> torch.Tensor:
        """Bring the main sequence to `sequence` (reusing the common prefix); return the
        last token's logits [V]."""
        common = 0
        limit = min(len(self.seq), len(sequence) - 1)  # always forward at least one token
        while common < limit and self.seq[common] == sequence[common]:
            common += 1
        self.ctx.seq_rm(self.main, common, -1)
        new = sequence[common:]
        logits = None
        for i in range(0, len(new), self.ctx.n_batch):  # prompts longer than a batch
            part = new[i : i + self.ctx.n_batch]
            start = common + i
            out = self.ctx.decode(part, range(start, start + len(part)),
                                  [[self.main]] * len(part),
                                  [False] * (len(part) - 1) + [True])
            self.counter.forwards += 1
            logits = out[-1]
        self.seq = list(sequence)
        return torch.from_numpy(logits)

    def _drop_tree(self) -> None:
        for seq in self.nodes.values():
            self.shared.drop(seq)
        self.nodes = {}

    def _drop_bets(self) -> None:
        for bet in self.bets:
            bet.close()
        self.bets = []

    def _forward_nodes(self, growth: Growth, start: int, stop: int) -> torch.Tensor:
        """Forward tree nodes start..stop-1, each in its own copy of its parent's sequence."""
        tree = growth.tree
        seqs = []
        for node in range(start, stop):
            parent = tree.parents[node]
            seq = self.shared.take()
            self.ctx.seq_cp(self.main if parent == -1 else self.nodes[parent], seq, -1, -1)
            self.nodes[node] = seq
            seqs.append(seq)
        positions = [growth.prefix_len + growth.depth[n] for n in range(start, stop)]
        return self._forward(tree.tokens[start:stop], positions, seqs)

    def _step(self, growth: Growth) -> None:
        start = len(growth.tree)
        if growth.select() == 0:
            return
        stop = len(growth.tree)
        if len(growth.tree) >= growth.shape.budget:
            return  # full: the last nodes need no children
        logits = self._forward_nodes(growth, start, stop)
        growth.forwarded = stop
        for row, node in enumerate(range(start, stop)):
            growth.offer(node, logits[row])

    def _grow(self, growth: Growth, cancel: threading.Event | None) -> None:
        while not growth.done and not (cancel is not None and cancel.is_set()):
            self._step(growth)

    # -- the drafter interface ------------------------------------------------------

    def draft(self, sequence: list[int], cancel: threading.Event | None = None) -> TokenTree:
        """Grow a tree after `sequence` (everything committed, pending token last)."""
        self._drop_tree()
        root_logits = self._extend(sequence)
        growth = Growth(self.shape, prefix_len=len(sequence))
        growth.offer(-1, root_logits)
        self.growth = growth
        self._grow(growth, cancel)
        return growth.tree

    def commit(self, tree: TokenTree, accepted: list[int]) -> None:
        """Keep the committed prefix and the accepted nodes that have KV cells."""
        growth = self.growth
        assert growth is not None and growth.tree is tree, "commit the tree last drafted"
        kept = [n for n in accepted if n < growth.forwarded]
        base = growth.prefix_len
        if kept:
            self.ctx.seq_cp(self.nodes[kept[-1]], self.main, base, base + len(kept))
        self.seq = self.seq + [tree.tokens[n] for n in kept]
        self._drop_tree()
        self._drop_bets()
        self.growth = None

    def bet(self, tree: TokenTree, cancel: threading.Event | None = None) -> Bet | None:
        """Guess the verdict on `tree` and draft the next tree on a copy (see
        `specedge.drafter.Drafter.bet`)."""
        growth = self.growth
        assert growth is not None and growth.tree is tree
        if growth.forwarded < len(tree):  # nodes added last: forward them once
            start, stop = growth.forwarded, len(tree)
            logits = self._forward_nodes(growth, start, stop)
            growth.forwarded = stop
            for row, node in enumerate(range(start, stop)):
                vals, toks = torch.topk(torch.log_softmax(logits[row].float(), -1), 2)
                growth.top[node] = (toks.tolist(), vals.tolist())
        best: tuple[float, int, int] | None = None
        for leaf in tree.leaves():
            toks, vals = growth.top[leaf]
            score = tree.logprobs[leaf] + vals[0]
            if best is None or score > best[0]:
                best = (score, leaf, toks[0])
        if best is None:
            return None
        _, node, token = best
        path = tree.path(node)
        sequence = self.seq + [tree.tokens[n] for n in path] + [token]
        side = LlamaDrafter(self.model, self.shape, _shared=self.shared)
        self.ctx.seq_cp(self.nodes[node], side.main, -1, -1)  # prefix + the path's cells
        side.seq = sequence[:-1]
        self.bets.append(side)
        next_tree = side.draft(sequence, cancel)
        return Bet(node=node, path=path, token=token, drafter=side, tree=next_tree)

    def prefill(self, sequence: list[int]) -> None:
        """Bring the main sequence to `sequence` (the next `draft` reuses it)."""
        self._drop_tree()
        self._extend(sequence)
        self.growth = None

    def bet_first(self, sequence: list[int], cancel: threading.Event | None = None) -> Bet:
        """Prefill on `sequence` and bet on the target's next token (see
        `specedge.drafter.Drafter.bet_first`)."""
        self._drop_tree()
        token = int(np.argmax(self._extend(sequence).numpy()))
        tree = self.draft([*sequence, token], cancel)
        return Bet(node=-1, path=[], token=token, drafter=self, tree=tree)

    def adopt(self, bet: Bet) -> TokenTree:
        """Take over a winning bet's sequences and finish its tree if it was cut short."""
        side = bet.drafter
        if side is self:  # a bet_first bet drafted on the main sequence
            assert self.growth is not None
            self._grow(self.growth, None)
            return self.growth.tree
        assert side.growth is not None
        side._grow(side.growth, None)
        self._drop_tree()
        self.bets = [b for b in self.bets if b is not side]
        self._drop_bets()
        self.shared.drop(self.main)
        self.main, self.seq, self.growth, self.nodes = side.main, side.seq, side.growth, side.nodes
        side.nodes, side.main = {}, -1
        return self.growth.tree

    def keep(self) -> int:
        """No prefix store on this engine: nothing kept for the next turn."""
        return 0

    def close(self) -> None:
        """Free this drafter's sequences (a bet's), or the whole context (the main one)."""
        self._drop_tree()
        self._drop_bets()
        if self.main >= 0:
            self.shared.drop(self.main)
            self.main = -1


class LlamaDraftModel:
    """A GGUF draft model where the node holds a torch one: it makes a drafter per
    generation (`node.generation` asks it through `new_drafter`)."""

    def __init__(self, model: LlamaModel, threads: int | None = None) -> None:
        self.model = model
        self.threads = threads
        self.vocab_size = model.n_vocab
        self.name = f"llama.cpp/{model.weight_type}"

    def new_drafter(self, shape: TreeShape, rows: int) -> LlamaDrafter:
        """A drafter whose context holds `rows` committed tokens and the trees in flight."""
        cells = (rows + 4 * (shape.budget + 1) + 255) // 256 * 256
        return LlamaDrafter(self.model, shape, n_ctx=cells, threads=self.threads)
