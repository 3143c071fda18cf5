"""The draft side: grow token trees, bet on the next one while a verification is out.

A `Drafter` owns the draft model's KV cache for one generation. `draft(sequence)` grows a
tree on top of the committed sequence; `commit(...)` keeps only the accepted path in the
cache. `bet(tree)` picks the most probable (node, next token) outcome of the pending
verification and grows the following tree from there on a copy of the cache, so that on
a hit the next tree is ready the moment the verdict arrives.
"""

from __future__ import annotations

import heapq
import math
import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from specedge import kvcache
from specedge.costs import CostCurve, worth_adding
from specedge.kvblocks import BlockStore, block_hashes
from specedge.trees import TokenTree, TreeShape, tree_mask, tree_positions


class Acceptance:
    """How often the target accepted draft tokens, by their rank among their siblings and
    their draft probability (tenths), measured over a generation's rounds.

    A dynamic tree needs each node's chance of acceptance, and a draft model's own
    probability is a poor one for a greedy target: its top token is accepted far more
    often than its probability says, its second one far less. Starting from the draft
    probability (weight PRIOR), each verdict moves the estimate towards what happened.
    """

    PRIOR = 2.0

    def __init__(self) -> None:
        self.hits: dict[tuple[int, int], float] = {}
        self.seen: dict[tuple[int, int], float] = {}

    @staticmethod
    def _key(rank: int, p: float) -> tuple[int, int]:
        return min(rank, 2), min(int(p * 10), 9)

    def estimate(self, rank: int, p: float) -> float:
        k = self._key(rank, p)
        return (self.hits.get(k, 0.0) + self.PRIOR * p) / (self.seen.get(k, 0.0) + self.PRIOR)

    def record(self, rank: int, p: float, accepted: bool) -> None:
        k = self._key(rank, p)
        self.hits[k] = self.hits.get(k, 0.0) + accepted
        self.seen[k] = self.seen.get(k, 0.0) + 1


@dataclass
class Growth:
    """A tree being grown best-first, one batch per step.

    Each step adds up to `max_width` of the best candidates whose parent is already in the
    tree, then forwards them (one draft pass) to collect their own candidate children.
    The result obeys the budget, the depth limit and the width limit; with width 1 it is
    a greedy chain. Best: the highest cumulative draft probability; for a dynamic shape,
    the highest estimated chance that the whole path is accepted (`Acceptance`), and the
    growth stops when the best candidate does not pay for its row (`worth_adding`).
    """

    shape: TreeShape
    prefix_len: int
    tree: TokenTree = field(default_factory=TokenTree)
    # (sort key, tie-break, parent, token, rank among siblings, draft logprob given parent)
    pool: list[tuple[float, int, int, int, int, float]] = field(default_factory=list)
    forwarded: int = 0  # nodes 0..forwarded-1 have KV rows in the cache
    # Top next-token candidates for every forwarded node (-1 = root): (tokens, logprobs).
    top: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)
    depth: list[int] = field(default_factory=list)
    # Per node: rank among siblings and draft probability given the parent (for learning).
    rank: list[int] = field(default_factory=list)
    cond_p: list[float] = field(default_factory=list)
    # Dynamic shapes: the verifier's pass cost, the rest of a round's time, the estimates.
    cost: CostCurve | None = None
    overhead_s: float = 0.0
    acceptance: Acceptance | None = None
    reach: list[float] = field(default_factory=list)  # estimated P(path accepted) per node
    expected: float = 1.0  # tokens a round yields: the bonus plus each node's reach
    stopped: bool = False  # a dynamic tree found no node worth its row
    _tick: int = 0

    @property
    def done(self) -> bool:
        return len(self.tree) >= self.shape.budget or not self.pool or self.stopped

    def _reach(self, parent: int, rank: int, lp: float) -> float:
        est = self.acceptance.estimate(rank, math.exp(lp)) if self.acceptance else math.exp(lp)
        return (1.0 if parent == -1 else self.reach[parent]) * est

    def _pays(self, reach: float) -> bool:
        if not self.shape.dynamic or self.cost is None or not len(self.tree):
            return True  # a tree has at least one node
        return worth_adding(reach, self.expected, len(self.tree) + 1, self.cost, self.overhead_s)

    def offer(self, node: int, logits: torch.Tensor) -> None:
        """Record `node`'s next-token distribution and push its best children as candidates."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        k = min(self.shape.max_width + 1, logp.shape[-1])
        vals, toks = torch.topk(logp, k)
        self.top[node] = (toks.tolist(), vals.tolist())
        node_depth = -1 if node == -1 else self.depth[node]
        if node_depth + 1 >= self.shape.max_depth:
            return
        base = 0.0 if node == -1 else self.tree.logprobs[node]
        pairs = zip(toks.tolist()[: self.shape.max_width], vals.tolist(), strict=False)
        for rank, (tok, lp) in enumerate(pairs):
            self._tick += 1
            key = -math.log(max(self._reach(node, rank, lp), 1e-30)) if self.shape.dynamic \
                else -(base + lp)
            heapq.heappush(self.pool, (key, self._tick, node, tok, rank, lp))

    def select(self) -> int:
        """Move up to max_width best candidates into the tree; return how many."""
        room = self.shape.budget - len(self.tree)
        added = 0
        while self.pool and added < min(room, self.shape.max_width):
            _, _, parent, tok, rank, lp = self.pool[0]
            reach = self._reach(parent, rank, lp)
            if not self._pays(reach):  # the best left does not pay: none does now
                # Nodes added in this step may still have children that pay (they get
                # their candidates once forwarded); without any, the tree is done.
                self.stopped = added == 0
                break
            heapq.heappop(self.pool)
            base = 0.0 if parent == -1 else self.tree.logprobs[parent]
            self.tree.add(parent, tok, base + lp)
            self.reach.append(reach)
            self.rank.append(rank)
            self.cond_p.append(math.exp(lp))
            self.expected += reach
            self.depth.append(0 if parent == -1 else self.depth[parent] + 1)
            added += 1
        return added

    def learn(self, accepted: list[int]) -> None:
        """Tell the estimates what the target did with each node it could have accepted
        (those whose parent it accepted)."""
        if self.acceptance is None:
            return
        kept = {-1, *accepted}
        for n, parent in enumerate(self.tree.parents):
            if parent in kept:
                self.acceptance.record(self.rank[n], self.cond_p[n], n in kept)


BETS = 2  # verdicts a node bets on at once (`Drafter.bet`)


class Drafter:
    """Draft model state for one generation (not thread-safe: one caller at a time)."""

    def __init__(self, model: PreTrainedModel, shape: TreeShape,
                 counter: ForwardCounter | None = None, store: BlockStore | None = None) -> None:
        """`store`: KV blocks of earlier conversations, to start from instead of prefilling
        (see `keep`)."""
        self.model = model
        self.store = store
        self.restored = 0  # prompt rows taken from the store instead of forwarded
        self.shape = shape
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = DynamicCache()
        self.seq: list[int] = []  # tokens whose KV rows are in the cache, in order
        self.growth: Growth | None = None
        # Dynamic shapes are sized against this (the verifier's advertised pass cost).
        self.cost: CostCurve | None = None
        self.overhead_s = 0.0  # a round's time besides the verify pass (network, waiting)
        self.bets = BETS  # verdicts to bet on at once while a request is out
        self.acceptance = Acceptance()  # shared with the bets' drafters
        # Shared with the drafters of bets, so wasted proactive work is counted too.
        self.counter = counter or ForwardCounter()

    # -- forward passes -------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, ids: list[int], positions: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=positions.to(self.device),
            attention_mask=None if mask is None else mask.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.counter.forwards += 1
        return out.logits[0]  # [len(ids), V]

    def _extend(self, sequence: list[int]) -> torch.Tensor:
        """Bring the cache to `sequence` (reusing the common prefix); return last logits [V]."""
        if not self.seq:
            self._restore(sequence)
        common = 0
        limit = min(len(self.seq), len(sequence) - 1)  # always forward at least one token
        while common < limit and self.seq[common] == sequence[common]:
            common += 1
        kvcache.truncate(self.cache, common)
        new = sequence[common:]
        positions = torch.arange(common, common + len(new))[None]
        logits = self._forward(new, positions, None)
        self.seq = list(sequence)
        return logits[-1]

    def _restore(self, sequence: list[int]) -> None:
        """Start an empty cache from the store's blocks of `sequence` (a follow-up turn,
        a shared system prompt): copied in, so the store's blocks stay untouched."""
        if self.store is None or not self.store.enabled:
            return
        blocks = self.store.lookup(sequence[:-1], self.device)  # the last one is forwarded
        if not blocks:
            return
        for layer in range(len(blocks[0].k)):
            self.cache.update(torch.cat([b.k[layer] for b in blocks], dim=-2),
                              torch.cat([b.v[layer] for b in blocks], dim=-2), layer)
        self.store.release(blocks)
        self.seq = list(sequence[: len(blocks) * self.store.block])
        self.restored += len(self.seq)

    def keep(self) -> int:
        """Put the full blocks of the rows this drafter holds for committed tokens into the
        store, for the next turn of the conversation; return how many were new."""
        store = self.store
        if store is None or not store.enabled:
            return 0
        b, added = store.block, 0
        layers = kvcache.layers(self.cache)
        for i, h in enumerate(block_hashes(self.seq, store.key, b)):
            if h in store.blocks or (store.disk is not None and h in store.disk):
                continue
            rows = slice(i * b, (i + 1) * b)
            data = torch.stack([torch.stack([k[0, :, rows], v[0, :, rows]]) for k, v in layers])
            store.release([store.add(h, data.contiguous())])
            added += 1
        return added

    def _step(self, growth: Growth) -> None:
        """Add one batch of nodes and, unless the tree is full, forward them."""
        start = len(growth.tree)
        if growth.select() == 0:
            return
        stop = len(growth.tree)
        if len(growth.tree) >= growth.shape.budget:
            return  # full: the last nodes need no children
        parents = growth.tree.parents
        logits = self._forward(
            growth.tree.tokens[start:stop],
            tree_positions(parents, growth.prefix_len, start, stop),
            tree_mask(parents, growth.prefix_len, start, stop, self.dtype),
        )
        growth.forwarded = stop
        for row, node in enumerate(range(start, stop)):
            growth.offer(node, logits[row])

    def _grow(self, growth: Growth, cancel: threading.Event | None) -> None:
        while not growth.done and not (cancel is not None and cancel.is_set()):
            self._step(growth)

    # -- public API -----------------------------------------------------------------

    def draft(self, sequence: list[int], cancel: threading.Event | None = None) -> TokenTree:
        """Grow a tree after `sequence` (everything committed so far, pending token last).

        `cancel` stops the growth between batches, leaving a smaller but valid tree.
        """
        growth = self._begin(sequence)
        self._grow(growth, cancel)
        return growth.tree

    def _begin(self, sequence: list[int]) -> Growth:
        root_logits = self._extend(sequence)
        growth = Growth(self.shape, prefix_len=len(sequence), cost=self.cost,
                        overhead_s=self.overhead_s, acceptance=self.acceptance)
        growth.offer(-1, root_logits)
        self.growth = growth
        return growth

    def commit(self, tree: TokenTree, accepted: list[int]) -> None:
        """Keep the committed prefix and the accepted nodes that already have KV rows."""
        growth = self.growth
        assert growth is not None and growth.tree is tree, "commit the tree last drafted"
        growth.learn(accepted)
        base = growth.prefix_len
        kept = [n for n in accepted if n < growth.forwarded]
        kvcache.keep_rows(self.cache, list(range(base)) + [base + n for n in kept])
        self.seq = self.seq + [tree.tokens[n] for n in kept]
        self.growth = None

    def bet(self, tree: TokenTree, cancel: threading.Event | None = None) -> Bet | Bets | None:
        """Guess the verdict on `tree` and draft the next tree as if the guess were right.

        A verdict is an accepted path and the target's token after it. Each outcome's
        probability is estimated from the draft model: the path's cumulative probability
        times the token's probability after it, for tokens that are not children in the
        tree (a child would have been accepted). The `self.bets` most likely outcomes get
        a tree each, grown a draft pass at a time in turn, most likely first, so the
        likeliest is furthest along when the verdict comes. Runs on copies of the cache,
        so a miss costs nothing but the work; `cancel` stops the growth between passes,
        leaving smaller but valid trees.
        """
        growth = self.growth
        assert growth is not None and growth.tree is tree
        self._forward_rest(growth)
        outcomes = _outcomes(tree, growth, self.bets)
        if not outcomes:
            return None
        bets = [self._side(growth, node, token) for node, token in outcomes]
        while not (cancel is not None and cancel.is_set()):
            live = [b for b in bets if not b.drafter.growth.done]
            if not live:
                break
            for b in live:
                if cancel is not None and cancel.is_set():
                    break
                b.drafter._step(b.drafter.growth)
        return bets[0] if len(bets) == 1 else Bets(bets)

    def _forward_rest(self, growth: Growth) -> None:
        """Nodes added last have no distribution yet: forward them once."""
        tree = growth.tree
        if growth.forwarded >= len(tree):
            return
        start, stop = growth.forwarded, len(tree)
        logits = self._forward(
            tree.tokens[start:stop],
            tree_positions(tree.parents, growth.prefix_len, start, stop),
            tree_mask(tree.parents, growth.prefix_len, start, stop, self.dtype),
        )
        growth.forwarded = stop
        k = max(growth.shape.max_width + 1, 2)
        for row, node in enumerate(range(start, stop)):
            vals, toks = torch.topk(torch.log_softmax(logits[row].float(), -1), k)
            growth.top[node] = (toks.tolist(), vals.tolist())

    def _side(self, growth: Growth, node: int, token: int) -> Bet:
        """A drafter for the outcome (accepted path to `node`, then `token`), its tree begun."""
        tree = growth.tree
        path = tree.path(node)
        prefix = growth.prefix_len
        sequence = self.seq + [tree.tokens[n] for n in path] + [token]
        # The bet's cache: committed rows, the path's rows, then the guessed token.
        side = Drafter(self.model, self.shape, self.counter)
        side.cost, side.overhead_s = self.cost, self.overhead_s
        side.acceptance = self.acceptance
        side.cache = kvcache.copy_rows(self.cache, list(range(prefix)) + [prefix + n for n in path])
        side.seq = sequence[:-1]
        side._begin(sequence)
        return Bet(node=node, path=path, token=token, drafter=side, tree=side.growth.tree)

    def prefill(self, sequence: list[int]) -> None:
        """Bring the draft model's cache to `sequence` (the next `draft` reuses it)."""
        self._extend(sequence)
        self.growth = None

    def bet_first(self, sequence: list[int], cancel: threading.Event | None = None) -> Bet:
        """Prefill the draft model on `sequence` and bet on the target's next token.

        The bet for a request with an empty tree (the verifier's answer is then just the
        target's token after `sequence`, e.g. the first token after a prompt, which
        comes from its prefill): the draft's own most likely next token, and the tree
        after it, drafted on the main cache since nothing else uses it yet. On a miss,
        `draft(sequence + [token])` reuses the prefilled rows.
        """
        token = int(torch.argmax(self._extend(sequence)))
        tree = self.draft([*sequence, token], cancel)
        return Bet(node=-1, path=[], token=token, drafter=self, tree=tree)

    def adopt(self, bet: Bet | Bets) -> TokenTree:
        """Take over a winning bet's cache and finish its tree if it was cut short."""
        if isinstance(bet, Bets):
            assert bet.winner is not None, "adopt a bet that hit"
            bet = bet.winner
        if self.growth is not None and bet.drafter is not self:  # the verdict it bet on
            self.growth.learn(bet.path)
        side = bet.drafter
        assert side.growth is not None
        side._grow(side.growth, None)
        self.cache, self.seq, self.growth = side.cache, side.seq, side.growth
        return side.growth.tree


@dataclass
class ForwardCounter:
    forwards: int = 0


@dataclass
class Bet:
    """A proactive guess at a verdict and the tree drafted for it."""

    node: int  # the leaf
    path: list[int]
    token: int
    drafter: Drafter
    tree: TokenTree

    def hit(self, accepted: list[int], bonus: int) -> bool:
        return accepted == self.path and bonus == self.token


@dataclass
class Bets:
    """Several guesses at one verdict, most likely first; `hit` remembers the winner."""

    bets: list[Bet]
    winner: Bet | None = None

    def hit(self, accepted: list[int], bonus: int) -> bool:
        self.winner = next((b for b in self.bets if b.hit(accepted, bonus)), None)
        return self.winner is not None


def _outcomes(tree: TokenTree, growth: Growth, count: int) -> list[tuple[int, int]]:
    """The verdicts (node, token) to bet on: the path to `node` (-1: none) is accepted,
    then the target picks `token`, which is no child of `node`.

    The odds of each come from the measured acceptance (`Acceptance`): the path is
    accepted (the node's reach), none of its children is, and the target's token is
    this one. First the best leaf with its top token ("a whole path is accepted", the
    likeliest outcome whenever the draft is any good), then the rest by their odds.
    """
    est = growth.acceptance.estimate if growth.acceptance else (lambda rank, p: p)
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents):
        kids.setdefault(p, []).append(i)
    scored = []
    for node in [-1, *range(len(tree))]:
        if node not in growth.top:
            continue
        reach = 1.0 if node == -1 else growth.reach[node]
        if reach <= 0.0:
            continue
        below = kids.get(node, [])
        stay = max(1.0 - sum(growth.reach[c] for c in below) / reach, 0.0)
        taken = {tree.tokens[c] for c in below}
        toks, vals = growth.top[node]
        for rank, (tok, lp) in enumerate(zip(toks, vals, strict=True)):
            if tok not in taken:
                scored.append((reach * stay * est(rank, math.exp(lp)), node, tok, rank))
    scored.sort(key=lambda x: -x[0])
    leaves = set(tree.leaves())
    first = next(((n, t) for _, n, t, rank in scored if n in leaves and rank == 0), None)
    picked = [] if first is None else [first]
    picked += [(n, t) for _, n, t, _ in scored if (n, t) != first]
    return picked[:count]
