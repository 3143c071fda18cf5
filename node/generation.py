"""The drafting loop over the wire: `specedge.engine.speculative_generate` split across a
network link, with proactive drafting while a request is in flight, and failover.

Each round the node sends its tree and, while the verifier works, bets on the verdict and
drafts the next tree in a worker thread (`Drafter.bet`). When the result arrives the bet
is stopped between draft batches; on a hit its tree is adopted (no drafting on the
critical path), on a miss the accepted path is committed and a fresh tree drafted. The
event loop never runs model code, so other sessions and the HTTP API keep moving.

Failover: when the verifier dies, stalls past `round_timeout` or refuses, the node opens
a session elsewhere with the prompt plus every committed token and resends the same tree
(it hangs off the same pending token). Token choice is a pure function of (seed,
position) and the target's logits, so the output is the same as without the failure.
"""

from __future__ import annotations

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

from specedge.drafter import Bet, Drafter
from specedge.engine import GREEDY, GenerationStats, Output
from specedge.models import vocab_size
from specedge.node.client import RoundResult, Session, SessionRequest
from specedge.node.errors import NodeError, NoVerifierError, VocabularyMismatch
from specedge.node.receipts import KeptReceipt, ReceiptBook
from specedge.protocol.errors import ProtocolError
from specedge.protocol.limits import RESULT_TIMEOUT
from specedge.sampling import SamplingParams
from specedge.trees import TokenTree, TreeShape

log = logging.getLogger("specedge.node")
__all__ = ["NodeError", "NoVerifierError", "VocabularyMismatch", "generate"]

OnTokens = Callable[[list[int]], None]
OnEvent = Callable[[str, dict], None]
DEFAULT_SHAPE = TreeShape.chain(4)
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
    time_to_first_token_ms: float | None = None
    inter_token_latency_ms: float | None = None
    mean_round_trip_ms: float | None = None


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
    return TreeShape(budget=budget, max_depth=min(shape.max_depth, budget),
                     max_width=shape.max_width)


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
    eos_ids: Sequence[int] = (),
    on_tokens: OnTokens | None = None,
    on_event: OnEvent | None = None,
    book: ReceiptBook | None = None,
    round_timeout: float = RESULT_TIMEOUT,
    max_failovers: int = MAX_FAILOVERS,
    stop: Callable[[], bool] | None = None,
) -> NodeGeneration:
    """Generate `max_new_tokens` (or up to end-of-sequence) with remote verification.

    `on_tokens` gets tokens as they are accepted; `on_event(kind, info)` gets "session"
    (a verifier took the generation), "round" (drafted and accepted counts) and
    "failover" (the verifier failed; info says which and why). `stop()` lets a caller
    end early (an API stop string) after any round. Raises NoVerifierError,
    VocabularyMismatch, or ValueError for bad parameters.
    """
    params.check()
    if not prompt_ids:
        raise ValueError("a generation needs at least one prompt token")
    clock = _Clock()
    stats = NodeStats()
    committed = [int(t) for t in prompt_ids]  # everything committed; the pending token last

    def emit(new: list[int]) -> None:
        clock.tick(len(new))
        if on_tokens is not None:
            on_tokens(new)

    def event(kind: str, **info: object) -> None:
        if on_event is not None:
            on_event(kind, info)

    out = Output(max_new_tokens, eos_ids, emit)
    drafter = Drafter(draft_model, shape)
    draft_vocab = vocab_size(draft_model)
    session: Session | None = None
    avoid: set[str] = set()
    receipts: list[KeptReceipt] = []
    round_trips: list[float] = []
    tree: TokenTree | None = None
    tree_draft_s = 0.0
    tree_proactive = False
    stopped_by_caller = False
    mismatch: VocabularyMismatch | None = None
    try:
        while not out.done:
            if session is None:
                request = SessionRequest(model_id, list(committed), params,
                                         max_new_tokens - len(out.tokens))
                try:
                    session = await connector.open_session(request, avoid)
                except NoVerifierError:
                    if mismatch is not None:  # every verifier left had the wrong vocabulary
                        raise mismatch from None
                    raise
                try:
                    check_vocabulary(draft_vocab, session)
                except VocabularyMismatch as exc:
                    # One misconfigured (or lying) verifier must not stop the node: try
                    # the others, and report the mismatch only if none fits.
                    mismatch = exc
                    avoid.add(session.verifier)
                    connector.failed(session.verifier, str(exc))
                    await session.abort()
                    session = None
                    continue
                drafter.shape = capped(drafter.shape, session.max_tree_tokens)
                if session.verifier not in stats.verifiers:
                    stats.verifiers.append(session.verifier)
                event("session", verifier=session.verifier, committed=len(committed))
            if tree is None:
                t0 = time.perf_counter()
                tree = await trio.to_thread.run_sync(drafter.draft, list(committed))
                tree_draft_s, tree_proactive = time.perf_counter() - t0, False
            n = min(len(tree), session.max_tree_tokens)

            def take(result: RoundResult, tree: TokenTree = tree, n: int = n,
                     verifier: str = session.verifier) -> None:
                # Runs the moment the verdict arrives, before the bet thread has stopped:
                # the user gets the tokens without waiting for speculative work.
                round_trips.append(result.round_trip_s)
                stats.record_round(n, len(result.accepted))
                event("round", verifier=verifier, drafted=n, accepted=len(result.accepted))
                new = [tree.tokens[i] for i in result.accepted] + [result.bonus]
                committed.extend(new)
                receipts.append(result.receipt)
                if book is not None:
                    book.keep(result.receipt)
                out.extend(new)

            result, failure, bet, bet_s = await _round(
                session, drafter, tree, n, proactive, tree_proactive, tree_draft_s,
                round_timeout, take)
            if failure is not None:
                failed = session.verifier
                await session.abort()
                session = None
                avoid.add(failed)
                connector.failed(failed, str(failure))
                stats.failovers += 1
                log.warning("verifier %s failed (%s); failing over", failed, failure)
                event("failover", verifier=failed, reason=str(failure),
                      committed=len(committed) - len(prompt_ids))
                if stats.failovers > max_failovers:
                    raise NoVerifierError(f"gave up after {stats.failovers} failovers; "
                                          f"last: {failure}")
                continue  # the same tree goes to the next verifier
            assert result is not None
            if bet is not None:
                stats.proactive_bets += 1
            if not out.done and stop is not None and stop():
                stopped_by_caller = out.done = True
            if out.done:
                break
            if bet is not None and bet.hit(result.accepted, result.bonus):
                stats.proactive_hits += 1
                t0 = time.perf_counter()
                tree = await trio.to_thread.run_sync(drafter.adopt, bet)
                tree_draft_s, tree_proactive = bet_s + time.perf_counter() - t0, True
            else:
                t0 = time.perf_counter()
                tree = await trio.to_thread.run_sync(
                    _commit_and_draft, drafter, tree, result.accepted, list(committed))
                tree_draft_s, tree_proactive = time.perf_counter() - t0, False
        if session is not None:
            await session.close()
            session = None
    finally:
        if session is not None:
            await session.abort()
    stats.target_forwards = stats.rounds
    stats.draft_forwards = drafter.counter.forwards
    stats.generated = len(out.tokens)
    stats.wall_s = time.perf_counter() - clock.start
    if round_trips:
        stats.mean_round_trip_ms = round(sum(round_trips) / len(round_trips) * 1e3, 3)
    clock.fill(stats)
    last = out.tokens[-1] if out.tokens else None
    hit_eos = last is not None and last in out.eos
    finish = "stop" if hit_eos or stopped_by_caller else "length"
    return NodeGeneration(out.tokens, stats, receipts, finish)


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

    threading.Thread(target=target, name="specedge-bet", daemon=True).start()
    with trio.CancelScope(shield=True):
        await done.wait()
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
    session: Session, drafter: Drafter, tree: TokenTree, n: int, proactive: bool,
    tree_proactive: bool, tree_draft_s: float, timeout: float,
    take: Callable[[RoundResult], None],
) -> tuple[RoundResult | None, ProtocolError | None, Bet | None, float]:
    """One request in flight, with the proactive bet drafted meanwhile in a thread.

    `take(result)` is called as soon as the result arrives. Returns (result, None, bet,
    bet seconds) or (None, failure, None, 0). The drafter is touched only by the bet
    thread until it returns: the nursery waits for it, and the result (or failure)
    stops it between draft batches.
    """
    cancel = threading.Event()
    box: list[tuple[Bet | None, float]] = []

    def bet() -> None:
        t0 = time.perf_counter()
        made = drafter.bet(tree, cancel)
        box.append((made, time.perf_counter() - t0))

    result: RoundResult | None = None
    failure: ProtocolError | None = None
    async with trio.open_nursery() as nursery:
        if proactive:
            nursery.start_soon(run_speculative, bet)
        try:
            result = await session.verify(tree.tokens[:n], tree.parents[:n],
                                          proactive=tree_proactive,
                                          draft_micros=int(tree_draft_s * 1e6), timeout=timeout)
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
