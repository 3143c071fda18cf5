"""Paged KV blocks: hashing, sharing, eviction, admission, the disk tier and its faults,
and the verifier engine reusing blocks without changing a token."""

from __future__ import annotations

import errno
import random

import pytest
import torch

from specedge import kvcache
from specedge.engine import autoregressive_generate
from specedge.kvblocks import (
    BLOCK_TOKENS,
    BlockStore,
    DiskTier,
    MemoryFull,
    block_hashes,
    model_key,
    store_for,
)
from specedge.models import build_tiny
from specedge.sampling import SamplingParams
from specedge.verifier.engine import TargetEngine, VerifyJob

B = BLOCK_TOKENS
KEY = model_key("test")


@pytest.fixture(scope="module")
def target():
    return build_tiny()[0]


def block(value: float, layers: int = 2) -> torch.Tensor:
    return torch.full((layers, 2, 2, B, 4), value)


def test_block_hashes_chain_on_every_earlier_token():
    tokens = list(range(3 * B + 5))
    hs = block_hashes(tokens, KEY)
    assert len(hs) == 3  # the partial last block has no hash
    assert block_hashes(tokens[: 2 * B], KEY) == hs[:2]  # a prefix hashes the same
    changed = list(tokens)
    changed[B + 3] = 999  # inside block 1: blocks 1 and 2 change, block 0 does not
    other = block_hashes(changed, KEY)
    assert other[0] == hs[0] and other[1] != hs[1] and other[2] != hs[2]
    assert block_hashes(tokens, model_key("another model"))[0] != hs[0]


def test_store_shares_evicts_lru_and_never_evicts_what_is_referenced():
    row = 2 * 2 * 2 * 4 * 4  # layers * k/v * heads * head_dim * float32 bytes
    store = BlockStore(KEY, row, budget_bytes=3 * row * B)
    hs = block_hashes(list(range(4 * B)), KEY)
    a = store.add(hs[0], block(0.0))
    assert store.add(hs[0], block(9.0)) is a and a.refs == 2  # the twin is shared
    store.release([a, a])
    b, c = store.add(hs[1], block(1.0)), store.add(hs[2], block(2.0))
    store.release([c])
    store.add(hs[3], block(3.0))  # over budget: the least recently used free block goes
    assert hs[0] not in store.blocks and hs[1] in store.blocks and hs[2] in store.blocks
    store.add(hs[0], block(0.0))
    assert hs[1] in store.blocks  # referenced: never evicted
    assert store.stats.evictions["device"] == 2
    del b


def test_lookup_stops_at_the_first_miss_and_counts_hits(target):
    store = store_for(target)
    tokens = list(range(3 * B + 7))
    engine = TargetEngine(target, prefill_chunk=64, store=store)
    state = engine.new_state(tokens, SamplingParams())
    while (job := engine.next_prefill(state)) is not None:
        engine.run([job])
    engine.release(state)
    assert len(store.blocks) == 3 and not store.sessions
    found = store.lookup(tokens[: 2 * B] + [7] * B, torch.device("cpu"))
    assert len(found) == 2 and store.stats.hits == 2 * B
    store.release(found)


def test_admission_counts_what_sessions_may_still_add(target):
    """A session reserves room for its prompt, max_new_tokens and a tree; one that would
    not fit is refused (MemoryFull, the verifier's BUSY) and nobody running is touched."""
    probe = store_for(target)
    rows = 2 * B + 8 + 64 + 65
    store = store_for(target, budget_bytes=int(rows * probe.row_bytes * 1.5))
    engine = TargetEngine(target, prefill_chunk=64, store=store)
    engine.tree_slack = 65
    first = engine.new_state(list(range(2 * B + 8)), SamplingParams(), max_new_tokens=64)
    with pytest.raises(MemoryFull, match="MiB of KV memory"):
        engine.new_state(list(range(100, 100 + 2 * B + 8)), SamplingParams(), 64)
    # The same prompt shares its blocks once they exist, so it needs less.
    while (job := engine.next_prefill(first)) is not None:
        engine.run([job])
    engine.release(first)
    again = engine.new_state(list(range(2 * B + 8)), SamplingParams(), max_new_tokens=64)
    assert again.cached == 2 * B
    engine.release(again)


def test_disk_tier_round_trips_and_refuses_anything_damaged(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, KEY)
    hs = block_hashes(list(range(5 * B)), KEY)
    data = torch.randn(2, 2, 2, B, 4).to(torch.bfloat16)
    assert tier.write(hs[0], data)
    assert torch.equal(tier.read(hs[0]), data)
    for h, damage in zip(hs[1:], ["flip", "truncate", "key", "empty"], strict=True):
        assert tier.write(h, data)
        path = tier.path(h)
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[-1] ^= 1
        elif damage == "truncate":
            raw = raw[: len(raw) // 2]
        elif damage == "key":
            raw[6] ^= 1  # inside the model key
        else:
            raw = bytearray()
        path.write_bytes(bytes(raw))
        assert tier.read(h) is None, damage
        assert not path.exists() and h not in tier  # deleted: recomputed next time


def test_disk_tier_cleans_torn_writes_keeps_its_budget_and_survives_a_full_disk(
        tmp_path, monkeypatch):
    (tmp_path / ".tmp-deadbeef-1").write_bytes(b"half a block")  # a crash mid-write
    data = torch.zeros(2, 2, 2, B, 4)
    size = None
    tier = DiskTier(tmp_path, 10 << 20, KEY)
    assert not list(tmp_path.glob(".tmp-*"))
    hs = block_hashes(list(range(6 * B)), KEY)
    assert tier.write(hs[0], data)
    size = tier.files[hs[0]]
    tier.budget = 3 * size
    for h in hs[1:4]:
        assert tier.write(h, data)
    assert hs[0] not in tier and len(tier.files) == 3 and tier.used <= tier.budget

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", full)
    assert not tier.write(hs[4], data)
    assert hs[4] not in tier and not list(tmp_path.glob(".tmp-*"))
    monkeypatch.undo()
    reopened = DiskTier(tmp_path, 10 << 20, KEY)  # a restart finds what is there
    assert set(reopened.files) == set(tier.files) and len(tier.files) == 2


# ---------------------------------------------------------------------------- lossless


def greedy_turn(engine: TargetEngine, prompt: list[int], n: int,
                params: SamplingParams) -> tuple[list[int], int]:
    """Generate n tokens with one-token trees (plain steps) through the paged engine;
    return them and how many prompt rows the session found cached."""
    state = engine.new_state(prompt, params, max_new_tokens=n)
    reused = state.cached
    while (job := engine.next_prefill(state)) is not None:
        engine.run([job])
    out: list[int] = []
    while len(out) < n:
        verdict = engine.run([VerifyJob(state, [], [])]).verdicts[0]
        out.extend(verdict.new_tokens)
    engine.release(state)
    return out[:n], reused


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, seed=5)],
                         ids=["greedy", "sampled"])
def test_follow_up_turns_reuse_blocks_and_change_no_token(target, params):
    """A five-turn conversation: each turn's prompt is the last one plus its answer plus
    a new user message. With reuse every turn after the first finds its history cached
    and prefills only the rest; tokens are those of the target alone (float32)."""
    rng = random.Random(3)
    system = [rng.randrange(259) for _ in range(70)]
    engine = TargetEngine(target, prefill_chunk=64)
    fresh = TargetEngine(target, prefill_chunk=64, store=store_for(target, enabled=False))
    history = list(system)
    for turn in range(5):
        history += [rng.randrange(259) for _ in range(11 + turn)]  # the user's message
        out, reused = greedy_turn(engine, list(history), 20, params)
        want = autoregressive_generate(target, history, 20, params).token_ids
        assert out == want, turn
        assert greedy_turn(fresh, list(history), 20, params) == (want, 0)
        if turn:
            assert reused >= (len(history) - 31 - 20) // B * B  # the whole history but
        history += out                                           # the last partial block
    st = engine.store.stats
    assert st.hits > 0 and fresh.store.stats.hits == 0


def test_blocks_evicted_to_disk_come_back_exact(target, tmp_path):
    probe = store_for(target)
    disk = DiskTier(tmp_path, 1 << 30, probe.key)
    store = store_for(target, budget_bytes=probe.row_bytes * 200, disk=disk)
    engine = TargetEngine(target, prefill_chunk=64, store=store)
    rng = random.Random(8)
    prompt = [rng.randrange(259) for _ in range(100)]
    first, _ = greedy_turn(engine, prompt, 12, SamplingParams())
    for _ in range(3):  # other conversations push the first one's blocks to disk
        greedy_turn(engine, [rng.randrange(259) for _ in range(100)], 4, SamplingParams())
    assert store.stats.disk_writes > 0
    again, reused = greedy_turn(engine, prompt, 12, SamplingParams())
    assert reused == 3 * B and store.stats.disk_restores >= 3
    assert again == first == autoregressive_generate(target, prompt, 12).token_ids


def test_a_damaged_disk_block_is_recomputed_not_used(target, tmp_path):
    probe = store_for(target)
    store = store_for(target, budget_bytes=probe.row_bytes * 200,
                      disk=DiskTier(tmp_path, 1 << 30, probe.key))
    engine = TargetEngine(target, prefill_chunk=64, store=store)
    rng = random.Random(9)
    prompt = [rng.randrange(259) for _ in range(100)]
    want, _ = greedy_turn(engine, prompt, 8, SamplingParams())
    greedy_turn(engine, [rng.randrange(259) for _ in range(100)], 4, SamplingParams())
    files = sorted(tmp_path.glob("*.kvb"))
    assert files
    for f in files:  # every block on disk gets a flipped bit
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        f.write_bytes(bytes(raw))
    got, _ = greedy_turn(engine, prompt, 8, SamplingParams())
    assert got == want and store.stats.checksum_failures >= 1


def test_paged_cache_gathers_exactly_what_a_plain_cache_holds(target):
    """Blocks plus tail read back as the rows a DynamicCache of the same pass holds."""
    from specedge.verification import TargetSession

    prompt = list(range(3 * B + 9))
    ref = TargetSession(target, prompt, SamplingParams())
    ref.prefill(64)
    engine = TargetEngine(target, prefill_chunk=64)
    state = engine.new_state(prompt, SamplingParams())
    while (job := engine.next_prefill(state)) is not None:
        engine.run([job])
    assert len(state.cache.blocks) == 3
    for (ka, va), (kb, vb) in zip(kvcache.layers(ref.cache), kvcache.layers(state.cache),
                                  strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_a_shared_system_prompt_is_held_once_by_live_sessions(target):
    """A second session whose prompt starts like a running one's takes the running one's
    sealed blocks (no prefill of them, no second copy), and both stay exact. A prompt
    that differs inside a block shares only the blocks before it: reuse is decided by
    hashing the tokens the verifier received, never by anything a node claims."""
    rng = random.Random(4)
    system = [rng.randrange(259) for _ in range(3 * B)]
    engine = TargetEngine(target, prefill_chunk=64)
    first = engine.new_state(system + [5, 6, 7], SamplingParams(), max_new_tokens=8)
    while (job := engine.next_prefill(first)) is not None:
        engine.run([job])
    held = engine.store.resident_bytes()
    second = engine.new_state(system + [9, 9, 9, 9], SamplingParams(), max_new_tokens=8)
    assert second.cached == 3 * B and engine.store.resident_bytes() == held
    assert [b.refs for b in first.cache.blocks] == [2, 2, 2]
    near = list(system)
    near[2 * B + 5] = (near[2 * B + 5] + 1) % 259  # one token off, inside block 2
    third = engine.new_state(near + [1], SamplingParams(), max_new_tokens=8)
    assert third.cached == 2 * B
    for state in (first, second, third):
        while (job := engine.next_prefill(state)) is not None:
            engine.run([job])
        out = []
        while len(out) < 8:
            out += engine.run([VerifyJob(state, [], [])]).verdicts[0].new_tokens
        prompt = state.tokens[: len(state.tokens) - len(out)]
        assert out[:8] == autoregressive_generate(target, prompt, 8).token_ids
        engine.release(state)
    assert not engine.store.sessions and all(b.refs == 0 for b in engine.store.blocks.values())
