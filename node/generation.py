"""The drafting loop over the wire: `specedge.engine.speculative_generate` split across a
network link, with proactive drafting while a request is in flight, and failover.

Each round the node sends its tree and, while the verifier works, bets on the verdict and
drafts the next tree in a worker thread (`Drafter.bet`). When the result arrives the bet
is stopped between draft batches; on a hit its tree is adopted (no drafting on the
critical path), on a miss the accepted path is committed and a fresh tree drafted. The
event loop never runs model code, so other sessions and the HTTP API keep moving.

First token at prefill speed: a 1.1 verifier acknowledges the session before its
prefill, and the node's first request is an empty tree, whose answer is the target's
token after the prompt: the user sees it after one prefill, as with plain decoding.
Meanwhile the node prefills its draft model and bets on that token (`Drafter.bet_first`),
so its first real tree is usually ready when the token arrives.

Failover: when the verifier dies, freezes, stops making progress or refuses, the node
opens a session elsewhere with the prompt plus every committed token and resends the
same tree (it hangs off the same pending token). Token choice is a pure function of
(seed, position) and the target's logits, so the output is the same as without the
failure.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio
from transformers import PreTrainedModel

from specedge.costs import CostCurve
from specedge.drafter import BETS, Bet, Bets, Drafter
from specedge.engine import GREEDY, GenerationStats, Output
from specedge.kvblocks import BlockStore
from specedge.models import vocab_size
from specedge.node.client import RoundResult, Session, SessionRequest
from specedge.node.errors import NodeError, NoVerifierError, VocabularyMismatch
from specedge.node.receipts import KeptReceipt, ReceiptBook
from specedge.protocol.errors import ProtocolError
from specedge.sampling import SamplingParams
from specedge.trees import DEFAULT_TREE, TokenTree, TreeShape

log = logging.getLogger("specedge.node")
__all__ = ["NodeError", "NoVerifierError", "VocabularyMismatch", "generate"]

OnTokens = Callable[[list[int]], None]
OnEvent = Callable[[str, dict], None]
DEFAULT_SHAPE = TreeShape.parse(DEFAULT_TREE)
MAX_FAILOVERS = 8


class Connector(Protocol):
    """Where sessions come from: `discovery.VerifierPool`, or a test double."""

    async def open_session(self, request: SessionRequest, avoid: set[str]) -> Session:
        """Open a session on the best verifier not in `avoid`; raise NoVerifierError."""
        ...

    def failed(self, verifier: str, reason: str) -> None:
        """A session on `verifier` failed: rank it last until it proves alive again."""
        ...


@dataclass
class NodeStats(GenerationStats):
    """The engine's statistics plus what only a networked generation has.

    `target_forwards` counts verification rounds (the node cannot see prefill passes).
    Latencies are from the start of `generate` (session opening and prefill included)."""

    verifiers: list[str] = field(default_factory=list)
    failovers: int = 0
    first_token_from_prefill: bool = False  # the first token came with the verifier's prefill
    first_guess_hit: bool | None = None  # the draft's bet on that token was right
    draft_prefix_reused: int = 0  # prompt tokens the draft model took from its KV store
    open_wait_ms: float | None = None  # asking for the first session until it was admitted
    time_to_first_token_ms: float | None = None
    inter_token_latency_ms: float | None = None
    mean_round_trip_ms: float | None = None
    # Where rounds' time went (seconds, all rounds): drafting the node waited for after a
    # verdict (the critical path), drafting a winning bet did while a request was out
    # (hidden), request-to-verdict, and the verifier's compute within it (receipts).
    draft_critical_s: float = 0.0
    draft_hidden_s: float = 0.0
    round_trip_s: float = 0.0
    verify_s: float = 0.0
    bet_wait_s: float = 0.0  # verdict in hand, waiting for the bet thread to stop


@dataclass
class NodeGeneration:
    token_ids: list[int]
    stats: NodeStats
    receipts: list[KeptReceipt]
    finish_reason: str  # "stop" (end of sequence or caller's stop) or "length"


def capped(shape: TreeShape, budget: int) -> TreeShape:
    """The shape limited to a verifier's tree budget."""
    if shape.budget <= budget:
        return shape
    return dataclasses.replace(shape, budget=budget, max_depth=min(shape.max_depth, budget))


def cost_curve(points: list[tuple[int, float]]) -> CostCurve | None:
    """The verifier's advertised pass cost, or None (then dynamic trees fill their budget)."""
    try:
        return CostCurve.of(points) if points else None
    except ValueError:  # validated on the wire; repeated row counts are merged
        return None


def check_vocabulary(draft_vocab: int, session: Session) -> None:
    """Refuse a verifier whose target cannot take every id the draft model can emit."""
    if draft_vocab > session.vocab_size:
        raise VocabularyMismatch(
            f"vocabulary mismatch: verifier {session.verifier} serves {session.model_id!r} with "
            f"{session.vocab_size} token ids, but the draft model emits {draft_vocab}. Use a "
            "draft model from the target's family.")


class _Clock:
    """Token arrival times for time-to-first-token and inter-token latency."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.count = 0

    def tick(self, n: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.count += n

    def fill(self, stats: NodeStats) -> None:
        if self.first is not None:
            stats.time_to_first_token_ms = round((self.first - self.start) * 1e3, 3)
        if self.first is not None and self.last is not None and self.count > 1:
            stats.inter_token_latency_ms = round(
                (self.last - self.first) * 1e3 / (self.count - 1), 3)


async def generate(
    draft_model: PreTrainedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    connector: Connector,
    model_id: str,
    params: SamplingParams = GREEDY,
    shape: TreeShape = DEFAULT_SHAPE,
    proactive: bool = True,
    bets: int = BETS,
    eos_ids: Sequence[int] = (),
    on_tokens: OnTokens | None = None,
    on_event: OnEvent | None = None,
    book: ReceiptBook | None = None,
    max_failovers: int = MAX_FAILOVERS,
    stop: Callable[[], bool] | None = None,
    store: BlockStore | None = None,
    top_logprobs: int = 0,
) -> NodeGeneration:
    """Generate `max_new_tokens` (or up to end-of-sequence) with remote verification.

    `on_tokens` gets tokens as they are accepted; `on_event(kind, info)` gets "session"
    (a verifier took the generation), "round" (drafted and accepted counts) and
    "failover" (the verifier failed; info says which and why). `stop()` lets a caller
    end early (an API stop string) after any round. `store`: the draft model's KV of
    earlier conversations (a follow-up turn drafts without prefilling what it holds;
    this conversation's blocks are added to it at the end). `top_logprobs`: alternatives
    the receipts list at each position (their facts give the API's logprobs). Raises NoVerifierError
    (VerifiersBusy when every verifier stayed busy), VocabularyMismatch, or ValueError
    for bad parameters.
    """
    params.check()
    if not prompt_ids:
        raise ValueError("a generation needs at least one prompt token")
    if hasattr(draft_model, "new_drafter"):  # llama.cpp (specedge.llama_drafter)
        drafter = draft_model.new_drafter(shape, len(prompt_ids) + max_new_tokens)
        draft_vocab = draft_model.vocab_size
    else:
        drafter, draft_vocab = Drafter(draft_model, shape, store=store), vocab_size(draft_model)
    if isinstance(drafter, Drafter):  # the llama.cpp drafter bets on the likeliest verdict
        drafter.bets = bets
    run = _Run(drafter, draft_vocab, prompt_ids,
               max_new_tokens, eos_ids, connector, model_id, params, proactive, on_tokens,
               on_event, book, max_failovers, stop)
    run.top_logprobs = top_logprobs
    try:
        while not run.out.done:
            if run.session is None and not await run.open():
                continue
            if not await run.round():
                break
        await run.close()
    finally:
        await run.abort()
    await trio.to_thread.run_sync(run.drafter.keep)  # for the conversation's next turn
    return run.result()


class _Run:
    """One generation's state between rounds: what is committed, the session, the tree
    to send next and how it was made, the receipts and the statistics."""

    def __init__(self, drafter: Drafter, draft_vocab: int, prompt_ids: Sequence[int],
                 max_new_tokens: int, eos_ids: Sequence[int], connector: Connector,
                 model_id: str, params: SamplingParams, proactive: bool,
                 on_tokens: OnTokens | None, on_event: OnEvent | None,
                 book: ReceiptBook | None, max_failovers: int,
                 stop: Callable[[], bool] | None) -> None:
        self.drafter, self.draft_vocab = drafter, draft_vocab
        self.connector, self.model_id, self.params = connector, model_id, params
        self.proactive, self.on_tokens, self.on_event = proactive, on_tokens, on_event
        self.book, self.max_failovers, self.stop = book, max_failovers, stop
        self.prompt_len = len(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.clock = _Clock()
        self.stats = NodeStats()
        self.committed = [int(t) for t in prompt_ids]  # everything committed; pending last
        self.out = Output(max_new_tokens, eos_ids, self._emit)
        self.session: Session | None = None
        self.avoid: set[str] = set()
        self.receipts: list[KeptReceipt] = []
        self.round_trips: list[float] = []
        self.tree: TokenTree | None = None  # the next tree to send; None: draft it first
        self.tree_draft_s = 0.0
        self.tree_proactive = False
        self.stopped_by_caller = False
        self.mismatch: VocabularyMismatch | None = None
        self.top_logprobs = 0

    def _emit(self, new: list[int]) -> None:
        self.clock.tick(len(new))
        if self.on_tokens is not None:
            self.on_tokens(new)

    def _event(self, kind: str, **info: object) -> None:
        if self.on_event is not None:
            self.on_event(kind, info)

    # -- sessions -------------------------------------------------------------------

    async def open(self) -> bool:
        """Open a session on the best verifier; False when it had to be refused (a
        vocabulary mismatch: the caller looks for another)."""
        request = SessionRequest(self.model_id, list(self.committed), self.params,
                                 self.max_new_tokens - len(self.out.tokens),
                                 top_logprobs=max(self.top_logprobs, 2))
        t0 = time.perf_counter()
        try:
            session = await self.connector.open_session(request, self.avoid)
        except NoVerifierError:
            if self.mismatch is not None:  # every verifier left had the wrong vocabulary
                raise self.mismatch from None
            raise
        try:
            check_vocabulary(self.draft_vocab, session)
        except VocabularyMismatch as exc:
            # One misconfigured (or lying) verifier must not stop the node: try the
            # others, and report the mismatch only if none fits.
            self.mismatch = exc
            self.avoid.add(session.verifier)
            self.connector.failed(session.verifier, str(exc))
            await session.abort()
            return False
        self.session = session
        if self.stats.open_wait_ms is None:  # the first open: admission and any BUSY waits
            self.stats.open_wait_ms = round((time.perf_counter() - t0) * 1e3, 3)
        self.drafter.shape = capped(self.drafter.shape, session.max_tree_tokens)
        self.drafter.cost = cost_curve(session.pass_costs)
        if session.verifier not in self.stats.verifiers:
            self.stats.verifiers.append(session.verifier)
        if self.tree is None and not self.out.tokens and session.liveness.progress:
            # The first token comes from the verifier's prefill: ask with an empty tree.
            self.tree, self.tree_draft_s, self.tree_proactive = TokenTree(), 0.0, False
            self.stats.first_token_from_prefill = True
        self._event("session", verifier=session.verifier, committed=len(self.committed))
        return True

    async def _failover(self, failure: ProtocolError) -> None:
        assert self.session is not None
        failed = self.session.verifier
        await self.session.abort()
        self.session = None
        again = getattr(self.connector, "still_there", None)  # a dead relay, not verifier
        if again is None or not await again(failed):
            self.avoid.add(failed)
            self.connector.failed(failed, str(failure))
        self.stats.failovers += 1
        log.warning("verifier %s failed (%s); failing over", failed, failure)
        self._event("failover", verifier=failed, reason=str(failure),
                    committed=len(self.committed) - self.prompt_len)
        if self.stats.failovers > self.max_failovers:
            raise NoVerifierError(f"gave up after {self.stats.failovers} failovers; "
                                  f"last: {failure}")

    async def close(self) -> None:
        if self.session is not None:
            served = getattr(self.connector, "served", None)
            if served is not None:  # the next turn goes where this one's KV is
                served(self.committed, self.session.verifier)
            await self.session.close()
            self.session = None

    async def abort(self) -> None:
        if self.session is not None:
            await self.session.abort()
            self.session = None

    # -- rounds ---------------------------------------------------------------------

    async def round(self) -> bool:
        """Send the next tree and take its verdict; False when the generation is over."""
        session = self.session
        assert session is not None
        if self.tree is None:
            t0 = time.perf_counter()
            self.tree = await trio.to_thread.run_sync(self.drafter.draft, list(self.committed))
            self.tree_draft_s, self.tree_proactive = time.perf_counter() - t0, False
            self.stats.draft_critical_s += self.tree_draft_s
        tree = self.tree
        n = min(len(tree), session.max_tree_tokens)
        arrived: list[float] = []

        def take(result: RoundResult) -> None:
            arrived.append(time.perf_counter())
            self._take(result, tree, n, session.verifier)

        result, failure, bet, bet_s = await _round(
            session, self._bettor(tree), tree, n, self.tree_proactive, self.tree_draft_s, take)
        if arrived and len(tree):
            self.stats.bet_wait_s += time.perf_counter() - arrived[0]
        if failure is not None:
            await self._failover(failure)
            return True  # the same tree goes to the next verifier
        assert result is not None
        if bet is not None and len(tree):
            self.stats.proactive_bets += 1
        if not self.out.done and self.stop is not None and self.stop():
            self.stopped_by_caller = self.out.done = True
        if self.out.done:
            return False
        await self._next_tree(tree, result, bet, bet_s)
        return True

    def _bettor(self, tree: TokenTree) -> Callable[[threading.Event], Bet | Bets | None] | None:
        """What the bet thread runs while `tree` is out, if anything."""
        if not len(tree) and self.proactive:  # the first token: bet on it meanwhile
            return lambda cancel: self.drafter.bet_first(list(self.committed), cancel)
        if not len(tree):  # not even a bet: still prefill the draft model meanwhile
            return lambda cancel: self.drafter.prefill(list(self.committed))
        if not self.proactive:
            return None
        return lambda cancel: self.drafter.bet(tree, cancel)

    def _take(self, result: RoundResult, tree: TokenTree, n: int, verifier: str) -> None:
        """Commit a verdict the moment it arrives, before the bet thread has stopped: the
        user gets the tokens without waiting for speculative work."""
        self.round_trips.append(result.round_trip_s)
        self.stats.round_trip_s += result.round_trip_s
        self.stats.verify_s += result.receipt.verify_micros / 1e6
        if n:
            self.stats.record_round(n, len(result.accepted))
        self._event("round", verifier=verifier, drafted=n, accepted=len(result.accepted),
                    facts=result.receipt.facts)
        new = [tree.tokens[i] for i in result.accepted] + [result.bonus]
        self.committed.extend(new)
        self.receipts.append(result.receipt)
        if self.book is not None:
            self.book.keep(result.receipt)
        self.out.extend(new)

    async def _next_tree(self, tree: TokenTree, result: RoundResult, bet: Bet | Bets | None,
                         bet_s: float) -> None:
        hit = bet is not None and bet.hit(result.accepted, result.bonus)
        if not len(tree):
            self.stats.first_guess_hit = hit if bet is not None else None
        elif hit:
            self.stats.proactive_hits += 1
        t0 = time.perf_counter()
        if hit:
            assert bet is not None
            self.tree = await trio.to_thread.run_sync(self.drafter.adopt, bet)
            waited = time.perf_counter() - t0
            self.tree_draft_s, self.tree_proactive = bet_s + waited, True
            self.stats.draft_critical_s += waited
            self.stats.draft_hidden_s += bet_s
            return
        if len(tree):
            self.tree = await trio.to_thread.run_sync(
                _commit_and_draft, self.drafter, tree, result.accepted, list(self.committed))
        else:
            self.tree = await trio.to_thread.run_sync(self.drafter.draft, list(self.committed))
        self.tree_draft_s, self.tree_proactive = time.perf_counter() - t0, False
        self.stats.draft_critical_s += self.tree_draft_s

    def result(self) -> NodeGeneration:
        stats, out = self.stats, self.out
        stats.target_forwards = stats.rounds
        stats.draft_forwards = self.drafter.counter.forwards
        stats.draft_prefix_reused = self.drafter.restored
        stats.generated = len(out.tokens)
        stats.wall_s = time.perf_counter() - self.clock.start
        if self.round_trips:
            stats.mean_round_trip_ms = round(
                sum(self.round_trips) / len(self.round_trips) * 1e3, 3)
        self.clock.fill(stats)
        last = out.tokens[-1] if out.tokens else None
        hit_eos = last is not None and last in out.eos
        finish = "stop" if hit_eos or self.stopped_by_caller else "length"
        return NodeGeneration(out.tokens, stats, self.receipts, finish)


BET_NICE = 19  # the lowest CPU priority: speculative work yields to everything else


async def run_speculative(fn: Callable[[], None]) -> None:
    """Run `fn` in a fresh thread at the lowest CPU priority and wait for it.

    A bet is speculative: when the CPU is short (a laptop, or node and verifier on one
    host) it must not slow the critical path (reading the result, the verifier's pass),
    and measured on a shared 2-core machine it did, doubling the round trip, until it
    ran niced. A fresh thread, not trio's cached workers: a niced thread cannot be
    un-niced without privileges, and a cached one would later run critical work. The
    wait is shielded: the thread touches the drafter until it returns, which the
    caller's cancel event makes quick.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    errors: list[BaseException] = []

    def target() -> None:
        _lower_priority()
        try:
            fn()
        except BaseException as exc:  # handed to the trio side below
            errors.append(exc)
        finally:
            try:
                trio.from_thread.run_sync(done.set, trio_token=token)
            except trio.RunFinishedError:
                pass

    thread = threading.Thread(target=target, name="specedge-bet", daemon=True)
    thread.start()
    with trio.CancelScope(shield=True):
        await done.wait()
        # The thread is still finishing (returning from `from_thread`): wait until it has
        # ended, so no thread of ours is alive when the interpreter exits (a daemon
        # thread killed inside torch's C++ code aborts the process: exit status 134).
        await trio.to_thread.run_sync(thread.join)
    if errors:
        raise errors[0]


def _lower_priority() -> None:
    # Per-thread nice is Linux behaviour (elsewhere PRIO_PROCESS would hit the process).
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BET_NICE)
        except OSError:
            pass


def _commit_and_draft(drafter: Drafter, tree: TokenTree, accepted: list[int],
                      committed: list[int]) -> TokenTree:
    drafter.commit(tree, accepted)
    return drafter.draft(committed)


async def _round(
    session: Session, bettor: Callable[[threading.Event], Bet | Bets | None] | None,
    tree: TokenTree, n: int, tree_proactive: bool, tree_draft_s: float,
    take: Callable[[RoundResult], None],
) -> tuple[RoundResult | None, ProtocolError | None, Bet | Bets | None, float]:
    """One request in flight, with the proactive bet (`bettor`) drafted meanwhile in a
    thread.

    `take(result)` is called as soon as the result arrives. Returns (result, None, bet,
    bet seconds) or (None, failure, None, 0). The drafter is touched only by the bet
    thread until it returns: the nursery waits for it, and the result (or failure)
    stops it between draft batches.
    """
    cancel = threading.Event()
    box: list[tuple[Bet | Bets | None, float]] = []

    def bet() -> None:
        assert bettor is not None
        t0 = time.perf_counter()
        made = bettor(cancel)
        box.append((made, time.perf_counter() - t0))

    result: RoundResult | None = None
    failure: ProtocolError | None = None
    async with trio.open_nursery() as nursery:
        if bettor is not None:
            nursery.start_soon(run_speculative, bet)
        try:
            result = await session.verify(tree.tokens[:n], tree.parents[:n],
                                          proactive=tree_proactive,
                                          draft_micros=int(tree_draft_s * 1e6))
        except ProtocolError as exc:
            failure = exc
        finally:
            cancel.set()
        if result is not None:
            take(result)
    if failure is not None:
        return None, failure, None, 0.0
    made, bet_s = box[0] if box else (None, 0.0)
    return result, None, made, bet_s
