"""The edge: a loaded draft model, the target's tokenizer, a source of verifier sessions
and a receipt book, serving generations for the CLI and the HTTP API alike.

The node never loads the target's weights; it needs only the target's tokenizer (to
turn text into the ids the verifier sees, and to check that the draft shares its
vocabulary) and its end-of-sequence ids. Activity counters live here so the live status
and the API report the same numbers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from specedge.drafter import BETS
from specedge.kvblocks import BlockStore, DiskTier, disk_pays, store_for
from specedge.models import (
    DEFAULT_DRAFT_FOR,
    DEMO_DRAFT,
    DEMO_TARGET,
    TINY_DRAFT,
    TINY_TARGET,
    ModelError,
    check_pair,
    tiny_tokenizer,
)
from specedge.node.generation import (
    DEFAULT_SHAPE,
    Connector,
    NodeGeneration,
    OnEvent,
    OnTokens,
    generate,
)
from specedge.node.receipts import ReceiptBook
from specedge.sampling import SamplingParams
from specedge.text import eos_ids
from specedge.trees import TreeShape


def draft_for(target: str, draft: str | None) -> str:
    """The draft model to use: the one given, else the preset paired with the target."""
    if draft:
        return draft
    if target in DEFAULT_DRAFT_FOR:
        return DEFAULT_DRAFT_FOR[target]
    raise ModelError(f"no default draft model for {target!r}: give --draft-model")


def load_target_tokenizer(name: str) -> tuple[PreTrainedTokenizerBase, GenerationConfig | None]:
    """The target's tokenizer and generation config, without its weights."""
    if name in (TINY_TARGET, TINY_DRAFT):
        return tiny_tokenizer(), None  # the tiny pair's config is the draft's own
    if name in (DEMO_TARGET, DEMO_DRAFT):
        from specedge.weights import prepare_demo_model

        path, kwargs = str(prepare_demo_model(name)), {}
    elif name.endswith(".gguf"):
        path, kwargs = str(Path(name).parent), {"gguf_file": Path(name).name}
    else:
        path, kwargs = name, {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {exc}") from exc
    try:
        config = GenerationConfig.from_pretrained(path, **kwargs)
    except OSError:
        config = None
    return tok, config


@dataclass
class Models:
    draft: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase  # the target's (== the draft's, checked)
    eos_ids: list[int]
    target_name: str
    draft_name: str
    store: BlockStore | None = None  # the draft model's KV of past conversations


@dataclass
class KvOptions:
    """Where the draft model's KV of past conversations is kept (RAM, then disk)."""

    ram_gb: float = 1.0
    disk_dir: Path | None = None  # None: no disk tier
    disk_gb: float = 2.0
    enabled: bool = True


def draft_store(model: PreTrainedModel, name: str, kv: KvOptions) -> BlockStore | None:
    """The node's KV block store for its draft model, with a disk tier when one is
    configured and reading a block back beats recomputing it (measured)."""
    if not kv.enabled:
        return None
    store = store_for(model, int(kv.ram_gb * 2**30), model_id=name)
    if kv.disk_dir is not None and kv.disk_gb > 0:
        folder = kv.disk_dir / store.key.hex()[:16]  # one folder per draft model and dtype
        if disk_pays(model, folder, store.block_bytes, store.block):
            store.disk = DiskTier(folder, int(kv.disk_gb * 2**30), store.key)
    return store


def load_models(target: str, draft: str | None, dtype: torch.dtype, device: str = "cpu",
                target_id: str | None = None, kv: KvOptions | None = None,
                engine: str = "torch", threads: int | None = None) -> Models:
    """Load the draft model and the target's tokenizer; refuse a vocabulary mismatch.

    `target_id`: the name verifiers know the target by, if not `target`. `kv`: where to
    keep the draft model's KV between requests (default: 1 GiB of RAM, no disk).
    `engine`: torch, llama.cpp or auto (measured; see `node.draft_engine`)."""
    from specedge.node.draft_engine import load_draft

    draft = draft_for(target, draft)
    target_tok, target_config = load_target_tokenizer(target)
    model, draft_tok = load_draft(draft, dtype, device, engine, threads)
    check_pair(draft_tok, target_tok, draft, target)
    if hasattr(model, "new_drafter"):  # llama.cpp: no torch warm-up, no KV block store
        eos = eos_ids(target_tok, target_config)
        return Models(model, target_tok, eos, target_id or target, draft, None)
    eos = eos_ids(target_tok, target_config or model.generation_config)
    warm_up(model)
    store = draft_store(model, draft, kv or KvOptions())
    return Models(model, target_tok, eos, target_id or target, draft, store)


@torch.inference_mode()
def warm_up(model: PreTrainedModel) -> None:
    """One throwaway forward: the first call of a model pays for allocations and kernel
    selection (hundreds of ms), which would otherwise land on the first user's first token."""
    device = next(model.parameters()).device
    model(input_ids=torch.zeros((1, 8), dtype=torch.long, device=device), use_cache=False)


@dataclass
class Activity:
    """What the edge has done since it started (this process), for status and API."""

    started: float = field(default_factory=time.monotonic)
    active: int = 0
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    proactive_hits: int = 0
    proactive_bets: int = 0
    failovers: int = 0
    last_event: str = ""
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, tokens)

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - window:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / window

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Edge:
    """Serves generations: one call per request, many at once."""

    def __init__(self, models: Models, connector: Connector, *, book: ReceiptBook | None = None,
                 shape: TreeShape = DEFAULT_SHAPE, proactive: bool = True,
                 bets: int = BETS) -> None:
        self.models = models
        self.connector = connector
        self.book = book
        self.shape = shape
        self.proactive = proactive
        self.bets = bets
        self.activity = Activity()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.models.tokenizer

    async def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                       params: SamplingParams, *, on_tokens: OnTokens | None = None,
                       on_event: OnEvent | None = None,
                       stop: Callable[[], bool] | None = None,
                       top_logprobs: int = 0) -> NodeGeneration:
        act = self.activity

        def tokens(new: list[int]) -> None:
            act.tokens += len(new)
            act.recent.append((time.monotonic(), len(new)))
            if on_tokens is not None:
                on_tokens(new)

        def event(kind: str, info: dict) -> None:
            if kind == "round":
                act.rounds += 1
                act.drafted += info["drafted"]
                act.accepted += info["accepted"]
            elif kind == "failover":
                act.failovers += 1
                act.last_event = f"failover from {info['verifier'][-8:]}: {info['reason']}"
            if on_event is not None:
                on_event(kind, info)

        act.active += 1
        try:
            gen = await generate(
                self.models.draft, prompt_ids, max_new_tokens, connector=self.connector,
                model_id=self.models.target_name, params=params, shape=self.shape,
                proactive=self.proactive, bets=self.bets, eos_ids=self.models.eos_ids,
                on_tokens=tokens, on_event=event, book=self.book, stop=stop,
                store=self.models.store, top_logprobs=top_logprobs)
        except BaseException:
            act.failed += 1
            raise
        finally:
            act.active -= 1
        act.completed += 1
        s = gen.stats
        act.proactive_hits += s.proactive_hits
        act.proactive_bets += s.proactive_bets
        return gen
