"""The batched target forward on llama.cpp: the torch engine's interface and verdicts.

Same jobs, same results (`verifier/engine.py`): a pass takes sessions' prefill chunks and
token trees, forwards them together, applies the one acceptance rule and keeps only the
accepted path of each tree. What differs is how llama.cpp is told who attends to whom:

- one context, one unified KV memory; each session owns a sequence id and its cached
  rows belong to that sequence. A pass is one `llama_decode` of every job's tokens
  (continuous batching: the weights are read once for all of them);
- a tree is verified in the same decode by tree attention through sequence-id sets:
  every leaf gets a temporary sequence, a copy of the session's sequence (free in a
  unified memory: the prefix cells just gain an id), and every tree node (the pending
  root first) belongs to the sequences of the leaves below it. llama.cpp masks a token
  by its first sequence and its position, and in any sequence a node belongs to, the
  cells at or before its position are exactly the prefix, its ancestors and itself;
- after choosing, the accepted path (root to the last accepted node) is copied from a
  leaf's sequence below that node into the session's sequence and every temporary
  sequence is removed: the rejected nodes' cells are freed, nothing is moved;
- prefill is chunked as in the torch engine (aligned chunks, one per pass per session).

There is no cross-session prefix cache here (the torch engine's KV blocks): each
session prefills its own prompt. Admission is by cells: a session reserves its prompt,
its `max_new_tokens` and a tree's slack out of the context's cells, and is refused
(kvblocks.MemoryFull, answered BUSY) when they are not free.

Exactness: the output is the served target's own output up to float rounding; llama.cpp's
kernels may sum in another order when the batch holds other sessions or a tree, so a
near-tie can flip (tests/test_llama_engine.py compares with llama.cpp's own greedy
decoding of the same file and reports the margins). The torch float32 path is the
bit-exact one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from specedge.acceptance import accept
from specedge.audit import Facts, position_facts
from specedge.kvblocks import MemoryFull
from specedge.llama import LlamaContext, LlamaModel
from specedge.sampling import SamplingParams, choose_tokens
from specedge.trees import depths, with_root
from specedge.verification import Verdict, choice_positions
from specedge.verifier.engine import (  # the same jobs, the same receipt facts
    Job,
    PassResult,
    PrefillJob,
    VerifyJob,
    prefill_chunk,
    record_facts,
)

# Sequence ids a context offers (llama.cpp's LLAMA_MAX_SEQ is 256); this share of them is
# kept for trees' temporary sequences, the rest are sessions.
TEMP_SHARE = 0.5
UNSAID_NEW_TOKENS = 1024  # reserved for a session opened without max_new_tokens


@dataclass
class LlamaState:
    """One session's target side: committed tokens (the pending one last) and how many
    of them the session's sequence holds in the KV memory."""

    tokens: list[int]
    params: SamplingParams
    seq: int
    reserved: int  # cells set aside for this session at admission
    row_bytes: int
    cached: int = 0
    top_logprobs: int = 0  # alternatives listed at each committed position (receipts)

    @property
    def prefix_len(self) -> int:
        return len(self.tokens) - 1

    @property
    def prefilled(self) -> bool:
        return self.cached >= self.prefix_len

    def kv_bytes(self) -> int:
        return self.cached * self.row_bytes


def _paths(parents: list[int]) -> tuple[list[list[int]], list[int]]:
    """Children of each node and the leaves of a tree given with the root (node 0)."""
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents):
        if parent >= 0:
            children[parent].append(node)
    return children, [n for n, c in enumerate(children) if not c]


class LlamaEngine:
    """Runs passes of jobs through a llama.cpp model (one pass at a time)."""

    def __init__(self, model: LlamaModel, max_batch_tokens: int, n_ctx: int,
                 prefill_chunk: int = 512, threads: int | None = None) -> None:
        self.model = model
        self.ctx = LlamaContext(model, n_ctx, max_batch_tokens, threads)
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = min(prefill_chunk, max_batch_tokens)
        self.name = f"llama.cpp/{model.weight_type}"
        self.dtype = model.weight_type
        self.exact = False  # see the module docstring
        self.tree_slack = 65
        self.vocab_size = model.n_vocab
        self.max_context = min(model.n_ctx_train or self.ctx.n_ctx, self.ctx.n_ctx)
        n_seq = self.ctx.n_seq_max
        self.session_slots = max(1, n_seq - max(1, int(n_seq * TEMP_SHARE)))
        self._free_sessions = list(range(self.session_slots - 1, -1, -1))
        self._free_temps = list(range(n_seq - 1, self.session_slots - 1, -1))
        # Each leaf of a tree takes a temporary sequence during its pass, so a tree never
        # needs more than there are (the verifier caps --max-tree-tokens at this).
        self.max_leaves = len(self._free_temps)
        self.reserved = 0
        self.passes = 0
        self.extra_pass_seconds = 0.0  # test-only, as in the torch engine
        self.row_bytes = _row_bytes(model)
        # Sessions come and go on the event loop while a pass runs in the engine thread:
        # a release during a pass waits for its end (llama.cpp's memory is not shared
        # between threads), the bookkeeping is behind a lock.
        self._lock = threading.Lock()
        self._busy = False
        self._ended: list[LlamaState] = []
        self.lock = threading.Lock()  # one decode at a time: passes and audit chunks

    # -- sessions -------------------------------------------------------------------

    def new_state(self, prompt: Sequence[int], params: SamplingParams,
                  max_new_tokens: int | None = None) -> LlamaState:
        """A session's state with its own sequence; raises MemoryFull when its cells
        (prompt + `max_new_tokens` + a tree) are not free."""
        if not prompt:
            raise ValueError("a session needs at least one prompt token")
        # Cells are shared by every session of the context: one that does not say how far
        # it goes is given UNSAID_NEW_TOKENS, not the whole context.
        rows = min(len(prompt) + (max_new_tokens or UNSAID_NEW_TOKENS), self.max_context)
        need = min(rows + self.tree_slack, self.ctx.n_ctx)
        with self._lock:
            if self.reserved + need > self.ctx.n_ctx:
                raise MemoryFull(f"the session needs {need} KV cells and "
                                 f"{self.ctx.n_ctx - self.reserved} of {self.ctx.n_ctx} "
                                 "are free")
            if not self._free_sessions:
                raise MemoryFull(f"all {self.session_slots} sequence slots are in use")
            seq = self._free_sessions.pop()  # empty: released sequences are cleared
            self.reserved += need
        return LlamaState(list(prompt), params, seq, need, self.row_bytes)

    def release(self, state: LlamaState) -> None:
        """The session ended: its cells are freed (after the pass under way, if any)."""
        with self._lock:
            if self._busy:
                self._ended.append(state)
            else:
                self._free(state)

    def _free(self, state: LlamaState) -> None:
        if state.seq < 0:
            return
        self.ctx.seq_rm(state.seq)
        self._free_sessions.append(state.seq)
        self.reserved -= state.reserved
        state.seq = -1
        state.cached = 0

    def next_prefill(self, state: LlamaState, limit: int | None = None) -> PrefillJob | None:
        """The session's next prefill chunk (None when prefilled), at most `limit` rows."""
        return prefill_chunk(state, self.prefill_chunk, limit)

    # -- a pass ---------------------------------------------------------------------

    def run(self, jobs: Sequence[Job]) -> PassResult:
        """One pass over `jobs` (usually one decode); commits verdicts into their sessions.

        Each session appears at most once. On failure every session is left as it was
        and the exception propagates."""
        if len({id(j.state) for j in jobs}) != len(jobs):
            raise ValueError("a session appears twice in one pass")
        if not jobs:
            return PassResult([], 0.0, 0)
        start = time.perf_counter()
        if self.extra_pass_seconds:
            time.sleep(self.extra_pass_seconds)
        for job in jobs:
            _check(job, self.max_leaves)
        with self._decoding():
            verdicts, rows = self._pass(jobs)
        self.passes += 1
        return PassResult(verdicts, time.perf_counter() - start, rows)

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        """Hold the context for a decode; sessions released meanwhile are freed after."""
        with self.lock:
            with self._lock:
                self._busy = True
            try:
                yield
            finally:
                with self._lock:
                    self._busy = False
                    ended, self._ended = self._ended, []
                    for state in ended:
                        self._free(state)

    def audit_facts(self, prompt: Sequence[int], committed: Sequence[int],
                    params: SamplingParams) -> list[Facts]:
        """An auditor's replay of a transcript (see engine.audit_facts): prefill-style, in
        `prefill_chunk` decodes of a sequence of its own that take turns with the passes.
        Raises MemoryFull when its cells are not free."""
        ids = [*prompt, *committed[:-1]]
        first = len(prompt) - 1  # the row whose logits choose committed[0]
        state = self.new_state(ids, params, max_new_tokens=1)
        facts: list[Facts] = []
        try:
            for start in range(0, len(ids), self.prefill_chunk):
                part = ids[start : start + self.prefill_chunk]
                outputs = [start + i >= first for i in range(len(part))]
                with self._decoding():
                    logits = self.ctx.decode(part, range(start, start + len(part)),
                                             [[state.seq]] * len(part), outputs)
                keep = len(logits)
                if not keep:
                    continue
                where = list(range(start + len(part) - keep + 1, start + len(part) + 1))
                done = len(facts)
                facts += position_facts(torch.from_numpy(logits), where, params,
                                        committed[done : done + keep])
        finally:
            self.release(state)
        return facts

    def _pass(self, jobs: Sequence[Job]) -> tuple[list[Verdict | None], int]:
        before = [(len(j.state.tokens), j.state.cached) for j in jobs]
        verdicts: dict[int, Verdict] = {}
        rows = 0
        try:
            for group in self._decodes(jobs):
                rows += self._decode(group, verdicts)
        except BaseException:
            for job, (n_tokens, cached) in zip(jobs, before, strict=True):
                state = job.state  # back to what the session held before the pass
                self.ctx.seq_rm(state.seq, cached, -1)
                del state.tokens[n_tokens:]
                state.cached = cached
            raise
        return [verdicts.get(id(job)) for job in jobs], rows

    def _decodes(self, jobs: Sequence[Job]) -> list[list[Job]]:
        """Pack jobs into decodes by rows and temporary sequences (one, unless the trees
        of many sessions need more temporary sequences than there are)."""
        out: list[list[Job]] = [[]]
        rows = temps = 0
        for job in jobs:
            need = _leaf_count(job)
            if out[-1] and (rows + job.size > self.max_batch_tokens
                            or temps + need > len(self._free_temps)):
                out.append([])
                rows = temps = 0
            out[-1].append(job)
            rows += job.size
            temps += need
        return out

    def _decode(self, jobs: list[Job], verdicts: dict[int, Verdict]) -> int:
        """One llama_decode of `jobs`; their verdicts are committed before it returns."""
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[list[int]] = []
        outputs: list[bool] = []  # logits for tree rows only
        temps: dict[int, dict[int, int]] = {}  # id(job) -> leaf -> temporary sequence
        try:
            for job in jobs:
                state = job.state
                if isinstance(job, PrefillJob):
                    tokens += state.tokens[job.start : job.stop]
                    positions += range(job.start, job.stop)
                    seqs += [[state.seq]] * job.size
                    outputs += [False] * job.size
                    continue
                parents = with_root(job.parents)
                below, temps[id(job)] = self._tree_sequences(state.seq, parents)
                tokens += [state.tokens[-1], *job.tokens]
                positions += [state.prefix_len + d for d in depths(parents)]
                seqs += below
                outputs += [True] * job.size
            logits = self.ctx.decode(tokens, positions, seqs, outputs)
            row = 0
            for job in jobs:
                if isinstance(job, PrefillJob):
                    job.state.cached = job.stop
                    continue
                path, bonus, facts = self._decide(job, logits[row : row + job.size])
                row += job.size
                verdicts[id(job)] = self._commit(job, temps[id(job)], path, bonus, facts)
        finally:
            for leaves in temps.values():
                for temp in leaves.values():
                    self.ctx.seq_rm(temp)
                    self._free_temps.append(temp)
        return len(tokens)

    def _tree_sequences(self, seq: int, parents: list[int]) -> tuple[list[list[int]],
                                                                     dict[int, int]]:
        """A temporary copy of `seq` per leaf; each node's sequences: its leaves'."""
        children, leaves = _paths(parents)
        below: list[list[int]] = [[] for _ in parents]
        temps: dict[int, int] = {}
        for leaf in leaves:
            temp = self._free_temps.pop()
            temps[leaf] = temp
            self.ctx.seq_cp(seq, temp, -1, -1)  # the cached prefix, shared
            node = leaf
            while node >= 0:
                below[node].append(temp)
                node = parents[node]
        return below, temps

    def _decide(self, job: VerifyJob,
                logits: np.ndarray) -> tuple[list[int], int, list[Facts]]:
        """(accepted path, bonus, the receipt's facts): the target's choices and the one
        acceptance rule."""
        rows = torch.from_numpy(logits)  # [n + 1, V]
        where = choice_positions(job.parents, job.state.prefix_len)
        chosen = choose_tokens(rows, where, job.state.params)
        path, bonus = accept(job.tokens, job.parents, chosen.tolist())
        return path, bonus, record_facts(rows, where, job, path, bonus)

    def _commit(self, job: VerifyJob, temps: dict[int, int], path: list[int],
                bonus: int, facts: list[Facts]) -> Verdict:
        """Copy root + accepted path from a leaf's sequence below its last node into the
        session's sequence (the temporary sequences are removed after the decode)."""
        state = job.state
        children, _leaves = _paths(with_root(job.parents))
        node = path[-1] + 1 if path else 0
        while children[node]:
            node = children[node][0]
        stop = state.prefix_len + 1 + len(path)
        self.ctx.seq_cp(temps[node], state.seq, state.prefix_len, stop)
        verdict = Verdict(path, bonus, [int(job.tokens[n]) for n in path], facts)
        state.tokens.extend(verdict.new_tokens)
        state.cached = stop
        return verdict


def _leaf_count(job: Job) -> int:
    return 0 if isinstance(job, PrefillJob) else len(_paths(with_root(job.parents))[1])


def _check(job: Job, max_leaves: int) -> None:
    state = job.state
    if state.seq < 0:
        raise ValueError("the session was released")
    if isinstance(job, VerifyJob):
        if not state.prefilled:
            raise ValueError("verify before the session is prefilled")
        depths(job.parents)  # parents must point backwards
        if _leaf_count(job) > max_leaves:
            raise ValueError(f"a tree may have at most {max_leaves} leaves here")
    elif job.start != state.cached or not 0 <= job.start < job.stop <= state.prefix_len:
        raise ValueError("prefill chunk does not continue the session's cache")


def _row_bytes(model: LlamaModel) -> int:
    """KV bytes per cached token (keys and values, float32, every layer)."""
    lib = model._lib
    heads = int(lib.llama_model_n_head(model.ptr))
    kv_heads = int(lib.llama_model_n_head_kv(model.ptr))
    return 2 * 4 * model.n_layer * kv_heads * (model.n_embd // max(heads, 1))
