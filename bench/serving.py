"""Server-side baselines, run in one process pinned to the server's cores.

- autoregressive: K streams decode one token per target pass, batched.
- server_only: K streams whose drafts are made on the server too: each round, the draft
  model extends every stream's chain one token per batched pass, then one batched
  target pass verifies every stream's chain. The server is busy for both. With a tree
  shape (`--tree`), each stream's tree is drafted as the node drafts it (`Drafter`,
  the same shape, dynamic ones against this engine's measured pass cost), one stream
  after another, then verified in one batched pass.
- assisted: transformers' own speculative decoding, `generate(assistant_model=...)`,
  one stream at a time (it does not batch): what a user runs instead of a network.

Both use the verifier's packed multi-session engine, so they batch exactly as the
SpecEdge verifier does. Each stream takes prompts from a shared queue until it is empty.
Run by `bench.run`; prints one JSON object (see `ModeResult`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specedge import kvcache
from specedge.costs import CostCurve
from specedge.drafter import Drafter
from specedge.kvblocks import store_for
from specedge.models import load_model
from specedge.sampling import SamplingParams
from specedge.text import eos_ids
from specedge.trees import TreeShape
from specedge.verifier.engine import PrefillJob, TargetEngine, TargetState, VerifyJob

GREEDY = SamplingParams()


@dataclass
class Request:
    index: int
    prompt: list[int]
    started: float = 0.0
    token_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class Stream:
    """One user stream on the server: its current request and its model states."""

    request: Request | None = None
    target: TargetState | None = None
    draft: TargetState | None = None
    drafted: int = 0  # draft tokens of the current round (server_only)
    drafter: Drafter | None = None  # server_only with a tree shape
    drafter_for: int = -1  # the request index the drafter holds


@dataclass
class Totals:
    busy_s: float = 0.0  # sum of pass times: the server's compute
    draft_busy_s: float = 0.0
    passes: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_samples: list[tuple[int, float]] = field(default_factory=list)  # (rows, ms)


def _take(req: Request, new: Sequence[int], now: float, limit: int, stop: set[int]) -> None:
    for tok in new:
        if req.done:
            return
        req.tokens.append(int(tok))
        req.token_times.append(now)
        req.done = int(tok) in stop or len(req.tokens) >= limit


def _assign(streams: list[Stream], queue: deque[tuple[int, list[int]]], target: TargetEngine,
            draft: TargetEngine | None) -> None:
    for s in streams:
        if s.request is not None and s.request.done:  # its caches go back to the engines
            target.release(s.target)
            if draft is not None and s.draft is not None:
                draft.release(s.draft)
        if (s.request is None or s.request.done) and queue:
            index, prompt = queue.popleft()
            s.request = Request(index, prompt, time.perf_counter())
            s.target = target.new_state(prompt, GREEDY)
            s.draft = draft.new_state(prompt, GREEDY) if draft else None
        elif s.request is not None and s.request.done:
            s.request = s.target = s.draft = None


def _run(engine: TargetEngine, jobs: list, totals: Totals, draft: bool = False) -> list:
    if not jobs:
        return []
    res = engine.run(jobs)
    totals.busy_s += res.seconds
    totals.passes += 1
    if draft:
        totals.draft_busy_s += res.seconds
    else:
        totals.verify_samples.append((res.tokens, res.seconds * 1000))
    return res.verdicts


def autoregressive(target: TargetEngine, prompts: list[list[int]], k: int, max_new: int,
                   stop: set[int], finished: list[Request], totals: Totals) -> None:
    queue = deque(enumerate(prompts))
    streams = [Stream() for _ in range(k)]
    while True:
        _assign(streams, queue, target, None)
        live = [s for s in streams if s.request is not None]
        if not live:
            return
        jobs = []
        for s in live:
            job = target.next_prefill(s.target) or VerifyJob(s.target, [], [])
            jobs.append(job)
        verdicts = _run(target, jobs, totals)
        now = time.perf_counter()
        for s, job, v in zip(live, jobs, verdicts, strict=True):
            if isinstance(job, VerifyJob):
                _take(s.request, v.new_tokens, now, max_new, stop)
                if s.request.done:
                    finished.append(s.request)


def _draft_step(draft: TargetEngine, streams: list[Stream], totals: Totals) -> None:
    """One batched draft pass: catch-up prefill where needed, else one greedy token."""
    jobs = []
    for s in streams:
        jobs.append(draft.next_prefill(s.draft) or VerifyJob(s.draft, [], []))
    verdicts = _run(draft, jobs, totals, draft=True)
    for s, job in zip(streams, jobs, strict=True):
        if isinstance(job, VerifyJob):
            s.drafted += 1
    del verdicts


def _rewind(draft: TargetEngine, s: Stream) -> None:
    """Make the draft state's tokens the target's committed tokens again, keeping the
    cache rows that still match."""
    committed = s.target.tokens
    have = s.draft.tokens
    common = 0
    limit = min(s.draft.cached, len(committed) - 1)
    while common < limit and have[common] == committed[common]:
        common += 1
    if hasattr(draft, "ctx"):  # llama.cpp: drop the session's cells past `common`
        draft.ctx.seq_rm(s.draft.seq, common, -1)
        s.draft.cached = common
    else:
        kvcache.keep_rows(s.draft.cache, range(common))
    s.draft.tokens = list(committed)
    s.drafted = 0


def server_only(target: TargetEngine, draft: TargetEngine, prompts: list[list[int]], k: int,
                max_new: int, chain: int, stop: set[int], finished: list[Request],
                totals: Totals) -> None:
    queue = deque(enumerate(prompts))
    streams = [Stream() for _ in range(k)]
    while True:
        _assign(streams, queue, target, draft)
        live = [s for s in streams if s.request is not None]
        if not live:
            return
        # Prefill new streams on the target (chunks), then draft for the ready ones.
        filling = [s for s in live if not s.target.prefilled]
        ready = [s for s in live if s.target.prefilled]
        while ready and min(s.drafted for s in ready) < chain:
            _draft_step(draft, [s for s in ready if s.drafted < chain], totals)
        jobs, owners = [], []
        for s in filling:
            jobs.append(target.next_prefill(s.target))
            owners.append(s)
        for s in ready:
            base = len(s.target.tokens)
            tokens = s.draft.tokens[base : base + chain]
            jobs.append(VerifyJob(s.target, tokens, list(range(-1, len(tokens) - 1))))
            owners.append(s)
        verdicts = _run(target, jobs, totals)
        now = time.perf_counter()
        for s, job, v in zip(owners, jobs, verdicts, strict=True):
            if isinstance(job, PrefillJob):
                continue
            totals.rounds += 1
            totals.drafted += len(job.tokens)
            totals.accepted += len(v.accepted)
            _take(s.request, v.new_tokens, now, max_new, stop)
            _rewind(draft, s)
            if s.request.done:
                finished.append(s.request)


def server_only_trees(target: TargetEngine, draft_model: torch.nn.Module,
                      prompts: list[list[int]], k: int, max_new: int, shape: TreeShape,
                      cost: CostCurve | None, stop: set[int], finished: list[Request],
                      totals: Totals) -> None:
    """server_only with trees: each stream drafts its tree as a node would (the server's
    core, one stream after another), then one batched target pass verifies them all."""
    queue = deque(enumerate(prompts))
    streams = [Stream() for _ in range(k)]
    while True:
        _assign(streams, queue, target, None)
        live = [s for s in streams if s.request is not None]
        if not live:
            return
        for s in live:
            if s.drafter is None or s.drafter_for != s.request.index:
                s.drafter, s.drafter_for = Drafter(draft_model, shape), s.request.index
                s.drafter.cost = cost
        jobs, owners, trees = [], [], []
        for s in live:
            if not s.target.prefilled:
                jobs.append(target.next_prefill(s.target))
                owners.append(s)
                continue
            t0 = time.perf_counter()
            tree = s.drafter.draft(list(s.target.tokens))
            spent = time.perf_counter() - t0
            totals.busy_s += spent
            totals.draft_busy_s += spent
            jobs.append(VerifyJob(s.target, tree.tokens, tree.parents))
            owners.append(s)
            trees.append(tree)
        verdicts = _run(target, jobs, totals)
        now = time.perf_counter()
        drafted = iter(trees)
        for s, job, v in zip(owners, jobs, verdicts, strict=True):
            if isinstance(job, PrefillJob):
                continue
            s.drafter.commit(next(drafted), v.accepted)
            totals.rounds += 1
            totals.drafted += len(job.tokens)
            totals.accepted += len(v.accepted)
            _take(s.request, v.new_tokens, now, max_new, stop)
            if s.request.done:
                finished.append(s.request)


class _TokenTimes:
    """A transformers streamer that notes when each generated token came out."""

    def __init__(self, request: Request, limit: int, stop: set[int]) -> None:
        self.request, self.limit, self.stop = request, limit, stop
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        _take(self.request, value.reshape(-1).tolist(), time.perf_counter(), self.limit,
              self.stop)

    def end(self) -> None:
        pass


def assisted(target_model: torch.nn.Module, draft_model: torch.nn.Module,
             prompts: list[list[int]], max_new: int, stop: set[int], finished: list[Request],
             totals: Totals) -> None:
    """transformers' assisted generation, greedy, one prompt after another; the server is
    busy for the whole of each generate() call (draft and target share it)."""
    for index, prompt in enumerate(prompts):
        req = Request(index, prompt, time.perf_counter())
        ids = torch.tensor([prompt], device=target_model.device)
        target_model.generate(
            ids, attention_mask=torch.ones_like(ids), assistant_model=draft_model,
            do_sample=False, max_new_tokens=max_new, eos_token_id=sorted(stop),
            pad_token_id=sorted(stop)[0], streamer=_TokenTimes(req, max_new, stop))
        totals.busy_s += time.perf_counter() - req.started
        totals.passes += 1
        finished.append(req)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def summarise(mode: str, k: int, finished: list[Request], totals: Totals, wall: float) -> dict:
    tokens = sum(len(r.tokens) for r in finished)
    ttft = [(r.token_times[0] - r.started) * 1000 for r in finished if r.token_times]
    itl = [(r.token_times[-1] - r.token_times[0]) * 1000 / (len(r.tokens) - 1)
           for r in finished if len(r.tokens) > 1]
    return {
        "mode": mode, "streams": k, "requests": len(finished), "tokens": tokens,
        "server_busy_s": round(totals.busy_s, 4), "wall_s": round(wall, 4),
        "server_draft_busy_s": round(totals.draft_busy_s, 4),
        "server_throughput_tps": round(tokens / totals.busy_s, 3) if totals.busy_s else None,
        "throughput_tps": round(tokens / wall, 3),
        "itl_ms_p50": percentile(itl, 0.5), "itl_ms_p95": percentile(itl, 0.95),
        "ttft_ms_p50": percentile(ttft, 0.5),
        "acceptance": round(totals.accepted / totals.drafted, 4) if totals.drafted else None,
        "mean_accepted_length": round(totals.accepted / totals.rounds, 4) if totals.rounds
        else None,
        "proactive_hit_rate": None,
        "passes": totals.passes,
        "rounds": totals.rounds,
        "verify_samples": totals.verify_samples,
        "token_ids": {r.index: r.tokens for r in finished},
    }


def _engine(args: argparse.Namespace, name: str) -> tuple[object, set[int]]:
    """The model `name` on the bench's engine, and its end-of-sequence ids."""
    if args.engine == "llama.cpp":
        from specedge.ggufs import gguf_path
        from specedge.llama import LlamaModel
        from specedge.node.edge import load_target_tokenizer
        from specedge.verifier import llama_engine

        engine = llama_engine.LlamaEngine(LlamaModel(gguf_path(name)), 1024, 16384,
                                          threads=len(os.sched_getaffinity(0)))
        tok, config = load_target_tokenizer(name)
        return engine, set(eos_ids(tok, config))
    model, tok = load_model(name, getattr(torch, args.dtype), args.device)
    # Today's engine for the baselines: no prefix reuse (as for SpecEdge in the main bench).
    engine = TargetEngine(model, store=store_for(model, enabled=False))
    return engine, set(eos_ids(tok, model.generation_config))


def run_mode(args: argparse.Namespace, target: object, stop: set[int],
             prompts: list[list[int]], finished: list[Request], totals: Totals) -> float:
    """Run the bench's mode over `prompts`; returns when its measured time started."""
    start = time.perf_counter()
    shape = TreeShape.parse(args.tree or f"chain:{args.chain}")
    if args.mode == "autoregressive":
        autoregressive(target, prompts, args.streams, args.max_new_tokens, stop, finished, totals)
    elif args.mode == "assisted" or shape.max_width > 1 or shape.dynamic:
        if args.engine != "torch":
            raise SystemExit(f"{args.mode} with {shape.spec()} runs on the torch engine only")
        target_model = target.model
        draft_model, _ = load_model(args.draft_model, getattr(torch, args.dtype), args.device)
        if args.mode == "assisted":
            assisted(target_model, draft_model, prompts[:1], 4, stop, [], Totals())  # warm-up
            start = time.perf_counter()
            assisted(target_model, draft_model, prompts, args.max_new_tokens, stop, finished,
                     totals)
        else:
            cost = None
            if shape.dynamic:
                from specedge.models import vocab_size
                from specedge.verifier.costprobe import measure_pass_costs

                points = measure_pass_costs(target, vocab_size(target_model), shape.budget + 1)
                cost = CostCurve.of((r, us / 1e6) for r, us in points)
            start = time.perf_counter()
            server_only_trees(target, draft_model, prompts, args.streams, args.max_new_tokens,
                              shape, cost, stop, finished, totals)
    else:
        draft, _ = _engine(args, args.draft_model)
        server_only(target, draft, prompts, args.streams, args.max_new_tokens, shape.budget,
                    stop, finished, totals)
    return start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=["autoregressive", "server_only", "assisted"],
                    required=True)
    ap.add_argument("--streams", type=int, required=True)
    ap.add_argument("--target-model", required=True)
    ap.add_argument("--draft-model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chain", type=int, default=4)
    ap.add_argument("--tree", default=None, help="draft shape (overrides --chain)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", required=True, help="JSON file: list of token-id lists")
    ap.add_argument("--engine", choices=["torch", "llama.cpp"], default="torch")
    args = ap.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process is pinned to
    prompts = json.load(open(args.prompts))
    target, stop = _engine(args, args.target_model)
    finished: list[Request] = []
    totals = Totals()
    # Warm-up: one short request, not counted.
    autoregressive(target, prompts[:1], 1, 2, stop, [], Totals())
    start = run_mode(args, target, stop, prompts, finished, totals)
    wall = time.perf_counter() - start
    print(json.dumps(summarise(args.mode, args.streams, finished, totals, wall)))


if __name__ == "__main__":
    main()
