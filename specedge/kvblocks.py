"""Paged KV: fixed-size blocks keyed by a chained hash of their tokens.

A block holds the keys and values of BLOCK_TOKENS consecutive tokens for every layer.
Its key is `hash(parent block's key, its token ids, the model)`, so two sequences share
a block exactly when they start with the same tokens up to its end (vLLM's automatic
prefix caching). Blocks are immutable once full; a session holds references to its full
blocks and a private tail (the rows of its last partial block and of the tree being
verified). A block outlives the session that made it: unreferenced blocks stay cached
and are evicted least-recently-used, to a lower tier when one is configured (host RAM
below a GPU, then a local disk folder), or dropped.

Why blocks rather than one tensor per session: a follow-up turn or a shared system
prompt is found by hashing, without the session that computed it; memory is counted in
blocks, so a session costs what it holds and a shared prefix is held once.

Disk blocks carry a checksum; one that does not verify (a torn write, a flipped bit, a
truncated file, another model's block) is deleted and recomputed, never used. Writes
go to a temporary name and are renamed into place, so a crash mid-write leaves no block.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("specedge.kvblocks")

BLOCK_TOKENS = 32
_MAGIC = b"SEKV1\n"
_HEADER = struct.Struct("<6s32s32s32sQ16sI")  # magic, model, hash, sha256, len, dtype, ndim


def model_key(*parts: object) -> bytes:
    """What a block's KV depends on besides its tokens: model id, revision, dtype..."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()


def next_hash(parent: bytes, ids: Sequence[int], key: bytes) -> bytes:
    """A block's hash: its parent's (the model key for the first), its ids, the model."""
    return hashlib.sha256(parent + struct.pack(f"<{len(ids)}I", *ids) + key).digest()


def block_hashes(tokens: Sequence[int], key: bytes, block: int = BLOCK_TOKENS) -> list[bytes]:
    """Chained hashes of the full blocks of `tokens` (a partial last block has none)."""
    out: list[bytes] = []
    parent = key
    for start in range(0, len(tokens) - block + 1, block):
        parent = next_hash(parent, tokens[start : start + block], key)
        out.append(parent)
    return out


class MemoryFull(Exception):
    """A session's rows do not fit the KV memory, even after evicting every cached block."""


@dataclass(eq=False)
class Block:
    """One full block: data [layers, 2 (k/v), kv_heads, BLOCK_TOKENS, head_dim]."""

    hash: bytes
    data: torch.Tensor | None  # None while the block lives only in a lower tier
    nbytes: int
    refs: int = 0
    tier: str = "device"  # where `data` is: "device", "host" (GPU setups) or "disk"
    # Per-layer views, built once: what a session's gather concatenates every pass.
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)

    def views(self) -> None:
        assert self.data is not None
        self.k = [self.data[i, 0][None] for i in range(self.data.shape[0])]  # [1, H, B, D]
        self.v = [self.data[i, 1][None] for i in range(self.data.shape[0])]


@dataclass
class StoreStats:
    """Counters for metrics (plain ints: the verifier exports them, the node shows them)."""

    queries: int = 0  # prompt tokens looked up (full blocks only)
    hits: int = 0  # of those, tokens found
    evictions: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0,
                                                               "disk": 0})
    disk_writes: int = 0
    disk_write_failures: int = 0
    disk_restores: int = 0
    checksum_failures: int = 0


class DiskTier:
    """Blocks as files `<hash>.kvb` in one folder, within a byte budget.

    The format: a fixed header (magic, model key, block hash, sha256 of the payload,
    payload length, dtype, rank), the shape, then the raw tensor bytes. Anything that
    does not check out on reading is deleted and reported as a miss.
    """

    def __init__(self, folder: Path, budget_bytes: int, key: bytes) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.budget = budget_bytes
        self.key = key
        self.files: OrderedDict[bytes, int] = OrderedDict()  # hash -> size, LRU order
        for tmp in self.folder.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)  # a crash mid-write left it: never a block
        for probe in self.folder.glob(".probe-*"):
            shutil.rmtree(probe, ignore_errors=True)  # a crash mid-measurement
        found = sorted(self.folder.glob("*.kvb"), key=lambda p: p.stat().st_mtime)
        for path in found:
            try:
                self.files[bytes.fromhex(path.stem)] = path.stat().st_size
            except ValueError:
                continue  # not ours
        self.used = sum(self.files.values())

    def path(self, h: bytes) -> Path:
        return self.folder / f"{h.hex()}.kvb"

    def __contains__(self, h: bytes) -> bool:
        return h in self.files

    def write(self, h: bytes, data: torch.Tensor) -> bool:
        """Store a block; False when it cannot (no room, a full disk, an I/O error)."""
        payload = data.contiguous().cpu().view(torch.uint8).numpy().tobytes()
        dtype = str(data.dtype).removeprefix("torch.").encode()
        shape = struct.pack(f"<{data.dim()}I", *data.shape)
        head = _HEADER.pack(_MAGIC, self.key, h, hashlib.sha256(payload).digest(),
                            len(payload), dtype.ljust(16, b"\0"), data.dim())
        size = len(head) + len(shape) + len(payload)
        while self.files and self.used + size > self.budget:
            self._drop(next(iter(self.files)))
        if size > self.budget:
            return False
        tmp = self.folder / f".tmp-{h.hex()}-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(head + shape + payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(h))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("cannot write a KV block to %s: %s", self.folder, exc)
            return False
        self.files[h] = size
        self.files.move_to_end(h)
        self.used += size
        return True

    def read(self, h: bytes) -> torch.Tensor | None:
        """The block's tensor, or None (missing, or failed its checks: then deleted)."""
        try:
            raw = self.path(h).read_bytes()
        except OSError:
            self._forget(h)
            return None
        data = self._decode(h, raw)
        if data is None:
            self._drop(h)
        else:
            self.files.move_to_end(h)
        return data

    def _decode(self, h: bytes, raw: bytes) -> torch.Tensor | None:
        if len(raw) < _HEADER.size:
            return None
        magic, key, bh, digest, length, dtype, ndim = _HEADER.unpack_from(raw)
        if magic != _MAGIC or key != self.key or bh != h or ndim > 8:
            return None
        shape_end = _HEADER.size + 4 * ndim
        payload = raw[shape_end:]
        if len(payload) != length or hashlib.sha256(payload).digest() != digest:
            return None
        shape = struct.unpack_from(f"<{ndim}I", raw, _HEADER.size)
        try:
            dt = getattr(torch, dtype.rstrip(b"\0").decode())
            flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            return flat.view(dt).reshape(shape)
        except (AttributeError, RuntimeError, TypeError, ValueError, UnicodeDecodeError):
            return None

    def _forget(self, h: bytes) -> None:
        size = self.files.pop(h, None)
        if size is not None:
            self.used -= size

    def _drop(self, h: bytes) -> None:
        self._forget(h)
        self.path(h).unlink(missing_ok=True)


def _locked(method):  # type: ignore[no-untyped-def]
    @functools.wraps(method)
    def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with self.lock:
            return method(self, *args, **kwargs)
    return run


class BlockStore:
    """The blocks of one model on one device, with their tiers and a byte budget.

    Device memory is shared between the blocks (referenced by sessions, or cached) and
    the sessions' private tails; `open` refuses a session whose rows could not fit
    after evicting every unreferenced block, so a running session never runs out.
    Thread use: the verifier's engine thread seals blocks while its event loop opens and
    closes sessions, and a node's drafting threads share one store: every public
    method holds the store's lock.
    """

    def __init__(self, key: bytes, row_bytes: int, budget_bytes: int, *,
                 block: int = BLOCK_TOKENS, host_budget_bytes: int = 0,
                 disk: DiskTier | None = None, enabled: bool = True) -> None:
        self.key = key
        self.block = block
        self.row_bytes = row_bytes  # KV bytes of one token, all layers
        self.block_bytes = row_bytes * block
        self.budget = budget_bytes
        self.host_budget = host_budget_bytes
        self.disk = disk
        # False (--no-prefix-cache): sessions keep their rows in their own tails, as
        # before blocks existed, and nothing is looked up or shared.
        self.enabled = enabled
        self.blocks: dict[bytes, Block] = {}
        self.cached: OrderedDict[bytes, Block] = OrderedDict()  # unreferenced, LRU first
        self.host: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # evicted below a GPU
        self.sessions: set[SessionKV] = set()
        self.stats = StoreStats()
        self.lock = threading.RLock()

    # -- memory -------------------------------------------------------------------

    @_locked
    def resident_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())

    @_locked
    def referenced_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values() if b.refs)

    def live_bytes(self) -> int:
        """Sessions' tails and the rows they may still add (reserved at admission)."""
        return sum(s.tail_bytes() + s.future_bytes() for s in self.sessions)

    @_locked
    def committed_bytes(self) -> int:
        """Memory spoken for: referenced blocks and what live sessions hold or may add."""
        return self.referenced_bytes() + self.live_bytes()

    @_locked
    def free_bytes(self) -> int:
        """What a new session may take (unreferenced blocks count as free: evictable)."""
        return self.budget - self.committed_bytes()

    def fits(self, rows: int) -> bool:
        return rows * self.row_bytes <= self.free_bytes()

    def _make_room(self, nbytes: int) -> None:
        """Evict cached blocks until every block, every live session's rows and
        reservation, and `nbytes` more fit the budget (the invariant that lets a
        running session grow without ever finding its memory gone)."""
        while self.cached and (self.resident_bytes() + self.live_bytes() + nbytes
                               > self.budget):
            _, block = self.cached.popitem(last=False)
            self._evict(block)

    def _evict(self, block: Block) -> None:
        """Move an unreferenced block down a tier (or drop it)."""
        del self.blocks[block.hash]
        self.stats.evictions["device"] += 1
        assert block.data is not None
        if self.host_budget and block.data.device.type != "cpu":
            self.host[block.hash] = block.data.to("cpu", non_blocking=False)
            self._trim_host()
        elif self.disk is not None and block.hash not in self.disk:
            if self.disk.write(block.hash, block.data):
                self.stats.disk_writes += 1
            else:
                self.stats.disk_write_failures += 1
        block.data, block.k, block.v = None, [], []

    def _trim_host(self) -> None:
        while self.host and len(self.host) * self.block_bytes > self.host_budget:
            h, data = self.host.popitem(last=False)
            self.stats.evictions["host"] += 1
            if self.disk is not None and h not in self.disk and self.disk.write(h, data):
                self.stats.disk_writes += 1

    # -- blocks -------------------------------------------------------------------

    @_locked
    def lookup(self, tokens: Sequence[int], device: torch.device) -> list[Block]:
        """The longest run of cached blocks that starts `tokens`, each now referenced
        (restored from a lower tier where needed). Release them with `release`."""
        hashes = block_hashes(tokens, self.key, self.block)
        self.stats.queries += len(hashes) * self.block
        found: list[Block] = []
        if not self.enabled:
            return found
        for h in hashes:
            block = self.blocks.get(h) or self._restore(h, device)
            if block is None:
                break
            self._ref(block)
            found.append(block)
        self.stats.hits += len(found) * self.block
        return found

    def _restore(self, h: bytes, device: torch.device) -> Block | None:
        data = self.host.pop(h, None)
        if data is None and self.disk is not None and h in self.disk:
            data = self.disk.read(h)
            if data is None:
                self.stats.checksum_failures += 1
                return None
            self.stats.disk_restores += 1
        if data is None:
            return None
        if data.shape[-2] != self.block or data.numel() * data.element_size() != \
                self.block_bytes:
            return None  # another block geometry: recompute
        self._make_room(self.block_bytes)
        return self._insert(h, data.to(device))

    def _insert(self, h: bytes, data: torch.Tensor) -> Block:
        block = Block(h, data, data.numel() * data.element_size())
        block.views()
        self.blocks[h] = block
        self.cached[h] = block
        return block

    def _ref(self, block: Block) -> None:
        if block.refs == 0:
            self.cached.pop(block.hash, None)
        block.refs += 1

    @_locked
    def release(self, blocks: Sequence[Block]) -> None:
        for block in blocks:
            block.refs -= 1
            if block.refs == 0 and block.hash in self.blocks:
                self.cached[block.hash] = block
                self.cached.move_to_end(block.hash)
        self._make_room(0)

    @_locked
    def add(self, h: bytes, data: torch.Tensor, from_tail: bool = False) -> Block:
        """A full block: the cached one with the same hash if any (its twin: same tokens,
        same model), else this one; referenced either way. `from_tail`: a session is
        sealing it out of its tail, whose room it already holds."""
        block = self.blocks.get(h)
        if block is None:
            nbytes = data.numel() * data.element_size()
            self._make_room(0 if from_tail else nbytes)
            block = self._insert(h, data)
        self._ref(block)
        return block

    @_locked
    def open(self, tokens: Sequence[int], max_rows: int, slack_rows: int,
             device: torch.device) -> SessionKV:
        """A session's cache: the cached blocks that start `tokens`, and room reserved
        for up to `max_rows` rows in all plus `slack_rows` of trees in flight.

        Raises MemoryFull when the rows it may add would not fit: admission happens
        here, so that a running session never finds its memory gone."""
        blocks = self.lookup(tokens, device)
        need = (max(max_rows - len(blocks) * self.block, 0) + slack_rows) * self.row_bytes
        if need > self.free_bytes():
            free = self.free_bytes()
            self.release(blocks)
            raise MemoryFull(f"the session needs {need / 2**20:.1f} MiB of KV memory and "
                             f"{max(free, 0) / 2**20:.1f} MiB are free")
        session = SessionKV(self, blocks, max_rows, slack_rows)
        self.sessions.add(session)
        self._make_room(0)  # cached blocks make way for its reservation
        return session


class SessionKV:
    """One session's KV: shared full blocks, then a private tail.

    It stands in for a transformers cache where the verifier needs one: `update` appends
    a pass's new rows to the tail and returns the session's whole keys and values for
    that layer, which is what attention reads; `get_mask_sizes` / `get_query_offset`
    answer the mask builder. Full committed rows of the tail are turned into blocks by
    `seal`, after the tokens they stand for are committed.
    """

    def __init__(self, store: BlockStore, blocks: list[Block], max_rows: int,
                 slack_rows: int) -> None:
        self.store = store
        self.blocks = blocks
        self.max_rows = max_rows
        self.slack_rows = slack_rows
        self.tail_k: list[torch.Tensor | None] = []
        self.tail_v: list[torch.Tensor | None] = []
        self.closed = False

    # -- the transformers cache protocol, as far as the engine uses it ---------------

    @property
    def block_rows(self) -> int:
        return len(self.blocks) * self.store.block

    def get_seq_length(self, layer_idx: int = 0) -> int:
        t = self.tail_k[layer_idx] if layer_idx < len(self.tail_k) else None
        return self.block_rows + (0 if t is None else t.shape[-2])

    def __len__(self) -> int:
        return self.get_seq_length(0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def update(self, keys: torch.Tensor, values: torch.Tensor,
               layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `keys`/`values` [1, H, n, D] to the tail; return every row [1, H, T, D]."""
        while len(self.tail_k) <= layer_idx:
            self.tail_k.append(None)
            self.tail_v.append(None)
        tk, tv = self.tail_k[layer_idx], self.tail_v[layer_idx]
        tk = keys if tk is None else torch.cat([tk, keys], dim=-2)
        tv = values if tv is None else torch.cat([tv, values], dim=-2)
        self.tail_k[layer_idx], self.tail_v[layer_idx] = tk, tv
        if not self.blocks:
            return tk, tv
        ks = [b.k[layer_idx] for b in self.blocks]
        vs = [b.v[layer_idx] for b in self.blocks]
        return torch.cat([*ks, tk], dim=-2), torch.cat([*vs, tv], dim=-2)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's keys and values [1, H, T, D] of one layer (a copy)."""
        ks = [b.k[layer_idx] for b in self.blocks]
        vs = [b.v[layer_idx] for b in self.blocks]
        if layer_idx < len(self.tail_k) and self.tail_k[layer_idx] is not None:
            ks.append(self.tail_k[layer_idx])
            vs.append(self.tail_v[layer_idx])
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    @property
    def num_layers(self) -> int:
        if self.blocks:
            return len(self.blocks[0].k)
        return sum(1 for t in self.tail_k if t is not None)

    def keep_rows(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep only `rows` (of all rows), in order. Block rows are immutable: they must be
        kept as they are, which is all a verdict or a rollback ever asks."""
        rows = [int(r) for r in rows]
        n = self.block_rows
        if rows[:n] != list(range(n)):
            raise ValueError("a verdict cannot drop rows of a full block")
        tail = torch.tensor([r - n for r in rows[n:]], dtype=torch.long)
        for i, (tk, tv) in enumerate(zip(self.tail_k, self.tail_v, strict=True)):
            if tk is None:
                continue
            index = tail.to(tk.device)
            self.tail_k[i] = tk.index_select(-2, index)
            self.tail_v[i] = tv.index_select(-2, index)

    # -- blocks -------------------------------------------------------------------

    def seal(self, tokens: Sequence[int], committed: int) -> None:
        """Turn the tail's full blocks among the first `committed` rows (whose tokens are
        `tokens[:committed]`) into shared blocks (not with --no-prefix-cache)."""
        b, key = self.store.block, self.store.key
        if not self.store.enabled:
            return
        while committed - self.block_rows >= b and self.tail_k and self.tail_k[0] is not None:
            start = self.block_rows
            parent = self.blocks[-1].hash if self.blocks else key
            h = next_hash(parent, tokens[start : start + b], key)
            data = torch.stack([torch.stack([k[0, :, :b], v[0, :, :b]])
                                for k, v in zip(self.tail_k, self.tail_v, strict=True)])
            self.blocks.append(self.store.add(h, data.contiguous(), from_tail=True))
            self.tail_k = [k[:, :, b:] for k in self.tail_k]
            self.tail_v = [v[:, :, b:] for v in self.tail_v]

    def tail_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.tail_k, *self.tail_v)
                   if t is not None)

    def future_bytes(self) -> int:
        """Room reserved for rows this session may still add."""
        rows = max(self.max_rows - len(self), 0) + self.slack_rows
        return rows * self.store.row_bytes

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks) + self.tail_bytes()

    def close(self) -> None:
        """The session ended: its blocks stay cached (unreferenced), its tail is freed."""
        if self.closed:
            return
        self.closed = True
        with self.store.lock:
            self.store.sessions.discard(self)
            self.store.release(self.blocks)
        self.blocks, self.tail_k, self.tail_v = [], [], []


def store_for(model: object, budget_bytes: int | None = None, *, model_id: str = "",
              enabled: bool = True, host_budget_bytes: int = 0,
              disk: DiskTier | None = None) -> BlockStore:
    """A block store sized for `model`'s KV rows (budget: unbounded when None). The key
    covers what KV depends on besides tokens: the model, its shape and dtype."""
    cfg = model.config  # type: ignore[attr-defined]
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = next(model.parameters()).dtype  # type: ignore[attr-defined]
    row = kv_row_bytes(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads,
                       head_dim, dtype)
    key = model_key(model_id or cfg.name_or_path, cfg.model_type, cfg.num_hidden_layers,
                    cfg.hidden_size, dtype)
    return BlockStore(key, row, budget_bytes if budget_bytes is not None else 1 << 62,
                      enabled=enabled, host_budget_bytes=host_budget_bytes, disk=disk)


def kv_row_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """KV bytes of one token across all layers (keys and values)."""
    return num_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def disk_pays(model: object, folder: Path, block_bytes: int, block_tokens: int) -> bool:
    """Whether reading a block back from `folder` beats recomputing it: both measured
    (a block's forward from scratch, which is the cheapest recompute there is)."""
    restore = measure_disk(folder, block_bytes)
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    ids = torch.zeros((1, block_tokens), dtype=torch.long, device=device)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)  # type: ignore[operator]  # warm-up
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)  # type: ignore[operator]
        recompute = time.perf_counter() - t0
    log.info("KV disk tier %s: reading a block back takes %.1f ms, recomputing it %.1f ms",
             "on" if restore < recompute else "off", restore * 1e3, recompute * 1e3)
    return restore < recompute


def measure_disk(folder: Path, block_bytes: int, rounds: int = 3) -> float:
    """Seconds to read back and verify one block on `folder`'s disk (median of `rounds`),
    in a scratch folder of its own: the blocks already there are left alone."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".probe-", dir=folder))
    try:
        tier = DiskTier(scratch, block_bytes * 4, b"\0" * 32)
        data = torch.randint(0, 255, (block_bytes,), dtype=torch.uint8)
        h = hashlib.sha256(b"probe").digest()
        times = []
        for _ in range(rounds):
            if not tier.write(h, data):
                return float("inf")
            t0 = time.perf_counter()
            tier.read(h)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
