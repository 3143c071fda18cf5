"""The batched target forward: many sessions' trees and prefill chunks in one pass.

One pass packs every job's tokens into a single row, input ids [1, N], so the target's
weights are read once for all of them (that is where batching pays: linear layers and
the LM head dominate a verification). Attention is the only part that mixes tokens, and
it runs per job over that job's own KV cache, with exactly the mask and the shapes the
one-session forward (`specedge.verification.TargetSession`) would use.

Why packed per-job attention and not a padded [B, T] batch over stacked caches:
- exactness: a padded batch changes the shapes of the attention reductions (keys of
  other lengths, masked padding in between), and with them the float rounding, so a
  session's logits would depend on who else is in the batch. Here each job's attention
  call sees the same tensors as the one-session forward, and the row-wise layers see
  the same rows, so float32 logits are bit-identical to `TargetSession`'s (tested);
- cost: stacking caches into one padded tensor copies every session's KV into it on
  every pass; here each session's cache is extended exactly as the one-session forward
  extends it, and nothing else is copied;
- no padding: N is the sum of the jobs' tokens, not batch x longest tree.

Linear layers: a BLAS picks its kernel by the number of rows M, and for a few small M
MKL's kernels round differently from its large-M kernel, whose rows do not depend on M
or on the other rows (measured here: M <= 3 with one thread; with two threads also
5-7 and 9-11). A small tree forwarded alone is such a product, so packed into a big one
its rows would round differently. The engine measures at start which row counts diverge
(`divergent_row_counts`) and, during a pass, recomputes the rows of those jobs with a
product of their own size (a forward hook on each linear layer). That costs one extra
small product per such job and nothing when there is none. It is on for float32, where
the project promises bit-exactness; `exact` says whether the probe found it possible.

How it plugs into Hugging Face models without copying them: the pass hands the model a
`PackedKV` as its cache. Its `update` appends each job's slice of the new keys/values to
that job's own `DynamicCache`; the attention function registered as `ATTENTION` (set on
the model only during a pass) then runs SDPA per job. Any model whose attention layers
use `past_key_values.update` and the attention-function registry works (Qwen2, Llama,
Mistral, ... in transformers 5).

Thread use: one pass at a time (the scheduler's single engine thread).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specedge import kvcache
from specedge.acceptance import accept
from specedge.audit import Facts, position_facts
from specedge.kvblocks import BlockStore, SessionKV, store_for
from specedge.sampling import SamplingParams, choose_tokens
from specedge.verification import Verdict, choice_positions, forward_inputs, kept_rows

ATTENTION = "specedge_packed"


# ---------------------------------------------------------------------------- state


@dataclass
class TargetState:
    """One session's target side: the committed tokens (the pending one last) and the
    KV cache of every committed token but the pending one, once prefilled.

    The same invariant as `TargetSession`; the engine fills the cache in prefill chunks
    (after the blocks it found cached) and then verifies trees against it.
    """

    tokens: list[int]
    params: SamplingParams
    cache: SessionKV | DynamicCache = field(default_factory=DynamicCache)
    top_logprobs: int = 0  # alternatives listed at each committed position (receipts)

    @property
    def prefix_len(self) -> int:
        return len(self.tokens) - 1

    @property
    def cached(self) -> int:
        return kvcache.cache_len(self.cache)

    @property
    def prefilled(self) -> bool:
        return self.cached >= self.prefix_len

    def kv_bytes(self) -> int:
        """Bytes held by this session's KV cache (shared blocks counted in full)."""
        if isinstance(self.cache, SessionKV):
            return self.cache.nbytes()
        total = 0
        for layer in self.cache.layers:
            if layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total


@dataclass
class PrefillJob:
    """Forward committed tokens [start, stop) of a session into its cache."""

    state: TargetState
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class VerifyJob:
    """Verify one tree against a prefilled session and commit the accepted path."""

    state: TargetState
    tokens: list[int]
    parents: list[int]

    @property
    def size(self) -> int:
        return len(self.tokens) + 1  # the pending root is forwarded too


Job = PrefillJob | VerifyJob


@dataclass
class PassResult:
    verdicts: list[Verdict | None]  # per job, None for prefill jobs
    seconds: float  # wall time of the pass (forward and acceptance)
    tokens: int  # rows forwarded

    def share(self, job: Job) -> float:
        """Seconds attributed to `job`: the pass's time split in proportion to rows.

        Rows are what a job adds to the pass (linear layers and LM head cost the same
        per row); attention over long caches costs more, but the split stays simple and
        the shares add up to the pass exactly.
        """
        return self.seconds * job.size / self.tokens if self.tokens else 0.0


# ---------------------------------------------------------------------------- packing


@dataclass
class _Segment:
    cache: DynamicCache  # the job's session cache; this pass appends to it
    start: int  # rows [start, stop) of the packed input
    stop: int
    mask: torch.Tensor | None  # exactly what the one-session forward would use


class PackedKV:
    """Stands in for the model's cache (and its attention mask) during one pass.

    `update` appends each segment's new keys/values to the segment's own cache and
    remembers the full per-segment tensors for the attention function.
    """

    def __init__(self, segments: list[_Segment]) -> None:
        self.segments = segments
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [1, Hkv, N, D]
        self.kv[layer_idx] = [
            seg.cache.update(
                key_states[:, :, seg.start : seg.stop],
                value_states[:, :, seg.start : seg.stop],
                layer_idx,
            )
            for seg in self.segments
        ]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # only consulted when position ids are missing; we always pass them


class _EveryLayerType(dict):
    """The model's per-layer-type mask mapping: the same PackedKV for every type."""

    def __init__(self, packed: PackedKV) -> None:
        super().__init__()
        self.packed = packed

    def __missing__(self, key: str) -> PackedKV:
        return self.packed


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """SDPA per segment over its own cache; plain SDPA for anything else."""
    if not isinstance(attention_mask, PackedKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = []
    # query: [1, H, N, D]; each segment's keys/values: [1, Hkv, cached + rows, D]
    for seg, (k, v) in zip(attention_mask.segments, attention_mask.kv[module.layer_idx],
                           strict=True):
        out, _ = sdpa_attention_forward(
            module, query[:, :, seg.start : seg.stop], k, v, seg.mask, **kwargs
        )
        outs.append(out)  # [1, rows, H, D]
    return torch.cat(outs, dim=1), None  # [1, N, H, D]


ALL_ATTENTION_FUNCTIONS.register(ATTENTION, packed_attention)


@contextlib.contextmanager
def _attention(configs: list, name: str) -> Iterator[None]:
    # Swapped for the pass only, so the model behaves as loaded everywhere else.
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, impl in zip(configs, old, strict=True):
            c._attn_implementation = impl


def _configs(model: PreTrainedModel) -> list:
    """Every distinct config object the model's modules read the attention choice from."""
    found = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    return list(found.values())


# ---------------------------------------------------------------------------- exact rows

# Row counts probed at start: every count up to 16, then a few larger ones. Counts above
# the largest probe are taken to behave like large products.
PROBE_ROWS = (*range(1, 17), 24, 32, 48, 64)


# Output features used to probe a layer: a BLAS picks its kernel by the number of rows,
# not by the width, and a full vocabulary-sized LM head would make the probe take
# seconds for a large model.
PROBE_FEATURES = 2048


@torch.inference_mode()
def divergent_row_counts(layer: torch.nn.Linear) -> frozenset[int] | None:
    """Row counts M for which `layer` on M rows rounds differently from the same rows
    inside a larger product; None when even large products disagree row-wise (then no
    batch can reproduce one-session results bit for bit)."""
    weight = layer.weight[:PROBE_FEATURES]  # [out', in]
    bias = None if layer.bias is None else layer.bias[:PROBE_FEATURES]
    big, offset = max(PROBE_ROWS), 37
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(big + offset, layer.in_features, generator=gen).to(weight)
    full = F.linear(x, weight, bias)  # [big + offset, out']
    if not torch.equal(full[offset:], F.linear(x[offset:], weight, bias)):
        return None

    def alone(start: int, rows: int) -> bool:  # rows computed alone equal rows in `full`
        part = F.linear(x[start : start + rows], weight, bias)
        return torch.equal(part, full[start : start + rows])

    return frozenset(m for m in PROBE_ROWS if not (alone(0, m) and alone(offset, m)))


class ExactRows:
    """Forward hooks that recompute tiny jobs' rows with a product of their own size.

    `spans` maps a linear layer's input row count to the (start, stop) row spans of the
    jobs in it: every job for the decoder layers, the verify jobs for the LM head.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.spans: dict[int, list[tuple[int, int]]] | None = None
        self.divergent: dict[tuple[int, int], frozenset[int]] = {}
        self.exact = True
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            shape = (module.in_features, module.out_features)
            if shape not in self.divergent:
                found = divergent_row_counts(module)
                self.exact &= found is not None
                self.divergent[shape] = found or frozenset()
            module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Linear, args: tuple[torch.Tensor, ...],
              output: torch.Tensor) -> torch.Tensor | None:
        if self.spans is None:
            return None
        spans = self.spans.get(output.shape[-2], ())
        bad = self.divergent[(module.in_features, module.out_features)]
        x = args[0]  # [1, R, in]; output [1, R, out]
        for start, stop in spans:
            if stop - start in bad:
                output[..., start:stop, :] = F.linear(x[..., start:stop, :], module.weight,
                                                      module.bias)
        return output

    @contextlib.contextmanager
    def planned(self, spans: dict[int, list[tuple[int, int]]]) -> Iterator[None]:
        self.spans = spans
        try:
            yield
        finally:
            self.spans = None


# ---------------------------------------------------------------------------- engine


class TargetEngine:
    """Runs passes of jobs through the target model (one pass at a time)."""

    def __init__(self, model: PreTrainedModel, prefill_chunk: int = 512,
                 exact: bool | None = None, store: BlockStore | None = None) -> None:
        """`exact`: reproduce one-session float rounding (default: for float32 only).
        `store`: where sessions' KV blocks live (default: unbounded, prefix reuse on)."""
        self.model = model
        self.store = store or store_for(model)
        self.tree_slack = 65  # rows a session may hold beyond its committed ones (a tree)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if exact is None:
            exact = self.dtype == torch.float32
        self.rows = ExactRows(model) if exact else None
        self._configs = _configs(model)
        # Prefill chunks start at multiples of this, as `TargetSession.prefill(chunk)`
        # does, so a session's cache is the same as the one-session forward's.
        self.prefill_chunk = prefill_chunk
        self.passes = 0
        self.lock = threading.Lock()
        # Test-only: seconds added to every pass, to play a slow machine (a CPU without
        # native bf16 takes 30 s for a 100-token prefill) with the tiny model.
        self.extra_pass_seconds = 0.0

    def new_state(self, prompt: Sequence[int], params: SamplingParams,
                  max_new_tokens: int | None = None) -> TargetState:
        """A session's state, its cache starting with the cached blocks of its prompt.

        Raises kvblocks.MemoryFull when its rows (prompt + `max_new_tokens`, default the
        model's context) could not fit the KV memory."""
        if not prompt:
            raise ValueError("a session needs at least one prompt token")
        limit = getattr(self.model.config, "max_position_embeddings", 0) or 1 << 20
        rows = min(len(prompt) + max_new_tokens, limit) if max_new_tokens else limit
        # The pending (last) token is never cached: look up the blocks before it.
        cache = self.store.open(prompt[:-1], rows, self.tree_slack, self.device)
        return TargetState(list(prompt), params, cache)

    def release(self, state: TargetState) -> None:
        """The session ended: its blocks stay cached for later sessions, the rest is freed."""
        if isinstance(state.cache, SessionKV):
            state.cache.close()

    def next_prefill(self, state: TargetState, limit: int | None = None) -> PrefillJob | None:
        """The session's next prefill chunk (None when prefilled), at most `limit` rows."""
        return prefill_chunk(state, self.prefill_chunk, limit)

    def _segment(self, job: Job, row: int) -> tuple[list[int], torch.Tensor, _Segment]:
        state = job.state
        if isinstance(job, VerifyJob):
            if not state.prefilled:
                raise ValueError("verify before the session is prefilled")
            ids, positions, mask = forward_inputs(
                state.tokens[-1], job.tokens, job.parents, state.prefix_len, self.dtype
            )
            mask = mask.to(self.device)
        else:
            if job.start != state.cached or not 0 <= job.start < job.stop <= state.prefix_len:
                raise ValueError("prefill chunk does not continue the session's cache")
            ids = state.tokens[job.start : job.stop]
            positions = torch.arange(job.start, job.stop)[None]
            # The mask the model would build for this chunk on its own (None: causal).
            mask = create_causal_mask(
                config=self.model.config,
                inputs_embeds=torch.empty((1, len(ids), 1), dtype=self.dtype, device=self.device),
                attention_mask=None,
                past_key_values=state.cache,
                position_ids=positions.to(self.device),
            )
        return ids, positions, _Segment(state.cache, row, row + len(ids), mask)

    @torch.inference_mode()
    def run(self, jobs: Sequence[Job]) -> PassResult:
        """One forward pass over all `jobs`; commits verdicts into their sessions.

        Each session appears at most once per pass. On failure every session is left as
        it was (caches cut back, nothing committed) and the exception propagates.
        """
        with self.lock:  # one pass at a time, audit chunks (verifier.audit) between them
            return self._run(jobs)

    def audit_facts(self, prompt: Sequence[int], committed: Sequence[int],
                    params: SamplingParams) -> list[Facts]:
        """An auditor's replay of a transcript on this engine's model (module function)."""
        return audit_facts(self.model, prompt, committed, params, chunk=self.prefill_chunk,
                           lock=self.lock)

    def _run(self, jobs: Sequence[Job]) -> PassResult:
        if len({id(j.state) for j in jobs}) != len(jobs):
            raise ValueError("a session appears twice in one pass")
        if not jobs:
            return PassResult([], 0.0, 0)
        start = time.perf_counter()
        if self.extra_pass_seconds:
            time.sleep(self.extra_pass_seconds)
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        segments: list[_Segment] = []
        keep: list[int] = []  # packed rows whose logits we need (verify jobs only)
        for job in jobs:
            seg_ids, seg_pos, seg = self._segment(job, len(ids))
            if isinstance(job, VerifyJob):
                keep.extend(range(seg.start, seg.stop))
            ids.extend(seg_ids)
            positions.append(seg_pos)
            segments.append(seg)
        before = [job.state.cached for job in jobs]
        packed = PackedKV(segments)
        spans = {len(keep): _verify_spans(jobs), len(ids): [(s.start, s.stop) for s in segments]}
        exact = self.rows.planned(spans) if self.rows else contextlib.nullcontext()
        try:
            with _attention(self._configs, ATTENTION), exact:
                logits = self.model(
                    input_ids=torch.tensor([ids], device=self.device),  # [1, N]
                    position_ids=torch.cat(positions, dim=1).to(self.device),  # [1, N]
                    attention_mask=_EveryLayerType(packed),
                    past_key_values=packed,
                    use_cache=True,
                    logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
                ).logits[0]  # [len(keep), V]
            decisions = self._decide(jobs, logits)
        except BaseException:
            for job, rows in zip(jobs, before, strict=True):
                kvcache.keep_rows(job.state.cache, range(rows))
            raise
        self.passes += 1
        verdicts = [None if d is None else self._commit(job, *d)
                    for job, d in zip(jobs, decisions, strict=True)]
        for job in jobs:  # committed rows that fill a block become shareable
            if isinstance(job.state.cache, SessionKV):
                job.state.cache.seal(job.state.tokens, job.state.cached)
        return PassResult(verdicts, time.perf_counter() - start, len(ids))

    @property
    def exact(self) -> bool:
        """Whether passes reproduce one-session results bit for bit on this platform."""
        return self.rows is not None and self.rows.exact

    def _decide(self, jobs: Sequence[Job],
                logits: torch.Tensor) -> list[tuple[list[int], int] | None]:
        """(accepted path, bonus) per verify job: the target's choices and the acceptance
        rule, before anything is committed."""
        out: list[tuple[list[int], int] | None] = []
        row = 0
        for job in jobs:
            if not isinstance(job, VerifyJob):
                out.append(None)
                continue
            prefix = job.state.prefix_len
            rows = logits[row : row + job.size]  # [n + 1, V]
            where = choice_positions(job.parents, prefix)
            chosen = choose_tokens(rows, where, job.state.params)
            path, bonus = accept(job.tokens, job.parents, chosen.tolist())
            out.append((path, bonus, record_facts(rows, where, job, path, bonus)))
            row += job.size
        return out

    def _commit(self, job: VerifyJob, path: list[int], bonus: int,
                facts: list[Facts]) -> Verdict:
        """Keep the accepted path in the cache and extend the committed tokens: what
        `TargetSession.verify` does after choosing."""
        state = job.state
        kvcache.keep_rows(state.cache, kept_rows(state.prefix_len, path))
        verdict = Verdict(path, bonus, [int(job.tokens[n]) for n in path], facts)
        state.tokens.extend(verdict.new_tokens)
        return verdict


def prefill_chunk(state: TargetState, chunk: int, limit: int | None) -> PrefillJob | None:
    """A session's next prefill chunk on any engine: up to the next multiple of `chunk`
    (aligned, so a session's cache does not depend on how its prefill was split), at most
    `limit` rows; None when the prompt is prefilled. `state` needs `cached`, `prefix_len`."""
    start = state.cached
    if start >= state.prefix_len:
        return None
    stop = min((start // chunk + 1) * chunk, state.prefix_len)
    if limit is not None:
        stop = min(stop, start + max(limit, 1))
    return PrefillJob(state, start, stop)


def record_facts(rows: torch.Tensor, where: Sequence[int], job: VerifyJob, path: list[int],
                 bonus: int) -> list[Facts]:
    """The receipt's facts for one verified tree: the rows of the root and of each
    accepted node (their choices are the committed tokens). Any engine that has a tree's
    logits [n + 1, V] and its choice positions can call this."""
    keep = [0, *(n + 1 for n in path)]
    committed = [*(int(job.tokens[n]) for n in path), bonus]
    return position_facts(rows[keep], [where[k] for k in keep], job.state.params, committed,
                          job.state.top_logprobs)


def audit_facts(model: PreTrainedModel, prompt: Sequence[int], committed: Sequence[int],
                params: SamplingParams, chunk: int = 512,
                lock: threading.Lock | None = None) -> list[Facts]:
    """An auditor's replay of a transcript, prefill-style: the target's choice at every
    committed position, and how far each committed token trailed it. Runs the model as
    loaded (no packing), `chunk` tokens a forward, each under `lock` (the engine's, so
    an audit takes turns with the passes instead of stalling them); any engine whose
    model takes `input_ids` and a cache and returns logits can use it."""
    device = next(model.parameters()).device
    ids = [*prompt, *committed[:-1]]
    first = len(prompt) - 1  # the row whose logits choose committed[0]
    cache = DynamicCache()
    facts: list[Facts] = []
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            keep = len(part) - max(first - start, 0)  # rows of this chunk that choose
            with lock or contextlib.nullcontext():
                logits = model(input_ids=torch.tensor([part], device=device),
                               position_ids=torch.arange(start, start + len(part),
                                                         device=device)[None],
                               past_key_values=cache, use_cache=True,
                               logits_to_keep=max(keep, 1)).logits[0]
            if keep <= 0:
                continue
            where = list(range(start + len(part) - keep + 1, start + len(part) + 1))
            done = len(facts)
            facts += position_facts(logits[-keep:], where, params,
                                    committed[done : done + keep])
    return facts


def _verify_spans(jobs: Sequence[Job]) -> list[tuple[int, int]]:
    # Row spans of the verify jobs among the LM head's input rows (prefill rows dropped).
    spans, row = [], 0
    for job in jobs:
        if isinstance(job, VerifyJob):
            spans.append((row, row + job.size))
            row += job.size
    return spans
