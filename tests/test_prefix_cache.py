"""Conversations that don't start over, with real verifier and node processes.

A chat through `specedge-node join`: every turn's prompt is the whole conversation so
far, and both the verifier (its KV blocks) and the node (its draft model's blocks) find
that history cached and prefill only what is new, without changing a token. The next
turn goes to the verifier that holds its blocks. Blocks evicted to disk come back; a
damaged, torn or missing disk block, a full disk and a verifier killed mid-write each
end in a recompute, never in a wrong token or a dead daemon.
"""

from __future__ import annotations

import shutil
import signal
import subprocess

import httpx
import pytest
from faultutil import Join, Verifier
from netutil import script

from specedge.engine import autoregressive_generate
from specedge.models import build_tiny
from specedge.text import eos_ids

pytestmark = pytest.mark.timeout(600)

SYSTEM = ("You are a careful assistant for a volunteer inference network. Answer in "
          "short sentences and show your working when there is arithmetic.")
QUESTIONS = ["What is a KV cache?", "Why reuse it across turns?", "And across users?",
             "What if the disk is full?"]
N = 16


@pytest.fixture(scope="module")
def tiny():
    target, tok = build_tiny()
    return target, tok, eos_ids(tok, target.generation_config)


def chat_ids(tok, messages: list[dict]) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def converse(node: Join, tiny, questions=QUESTIONS, system: str = SYSTEM) -> list[dict]:
    """Chat turn by turn; check every answer against the target alone; return the
    'specedge' extras of each turn."""
    target, tok, eos = tiny
    messages = [{"role": "system", "content": system}]
    extras = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        body = {"model": "tiny-test", "messages": messages, "max_tokens": N,
                "temperature": 0}
        r = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, (r.text, node.proc.describe())
        extra = r.json()["specedge"]
        want = autoregressive_generate(target, chat_ids(tok, messages), N,
                                       eos_ids=eos).token_ids
        assert extra["token_ids"] == want, (question, extra)
        messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]
                         ["content"]})
        extras.append(extra)
    return extras


def hits(v: Verifier) -> float:
    return v.metric("specedge_prefix_cache_hits_total")


def test_follow_up_turns_reuse_the_conversation_and_go_where_it_is(tmp_path, tiny):
    """Two verifiers, two conversations with the same system prompt: every turn after
    the first finds its history cached on the verifier (prefix_cache_hits) and in the
    node's draft store (draft_prefix_reused); each conversation stays on the verifier
    that served its first turn (prefix-aware routing); the second user shares the first
    one's system-prompt blocks where it lands on the same verifier."""
    verifiers = [Verifier(tmp_path, name, "--no-dht") for name in ("a", "b")]
    for v in verifiers:
        v.ready()
    node = Join(tmp_path, "node", *(v.addr for v in verifiers))
    try:
        node.ready()
        system_rows = len(chat_ids(tiny[1], [{"role": "system", "content": SYSTEM}]))
        for _ in range(2):
            before = sum(hits(v) for v in verifiers)
            extras = converse(node, tiny)
            assert len({tuple(e["verifiers"]) for e in extras}) == 1, extras  # one home
            gained = sum(hits(v) for v in verifiers) - before
            assert gained >= 3 * (system_rows // 32) * 32  # turns 2-4: at least the system
            assert all(e["draft_prefix_reused"] >= 32 for e in extras[1:])
    finally:
        node.proc.kill()
        for v in verifiers:
            v.kill()


def _disk_verifier(tmp_path, name: str, disk, *extra: str) -> Verifier:
    # About 400 rows of KV memory: each conversation pushes the last one's out.
    return Verifier(tmp_path, name, "--no-dht", "--kv-cache-gb", "0.0002", "--kv-disk-dir",
                    str(disk), *extra).ready()


def test_damaged_disk_blocks_are_recomputed_never_used(tmp_path, tiny):
    disk = tmp_path / "kv"
    disk.mkdir()
    (disk / ".tmp-0123-99").write_bytes(b"torn")  # what a kill -9 mid-write leaves
    (disk / ("ab" * 32 + ".kvb")).write_bytes(b"not a block")
    verifier = _disk_verifier(tmp_path, "v", disk)
    node = Join(tmp_path, "node", verifier.addr, extra=("--no-prefix-cache",))
    try:
        node.ready()
        assert not list(disk.glob(".tmp-*"))
        systems = [f"{SYSTEM} Conversation {i}." for i in range(3)]
        for system in systems:
            converse(node, tiny, QUESTIONS[:2], system)
        assert len(list(disk.glob("*.kvb"))) > 1  # blocks were evicted to disk
        for f in disk.glob("*.kvb"):  # damage every block on disk: flip, truncate
            raw = f.read_bytes()
            f.write_bytes(raw[: len(raw) // 2] if len(raw) % 2 else
                          raw[:-1] + bytes([raw[-1] ^ 1]))
        for system in systems:  # the same conversations again: exact, recomputed
            converse(node, tiny, QUESTIONS[:2], system)
        assert verifier.metric("specedge_kv_checksum_failures_total") >= 1
        assert verifier.proc.alive()
    finally:
        node.proc.kill()
        verifier.kill()


@pytest.mark.slow
def test_killed_mid_write_then_restarted_on_the_same_disk(tmp_path, tiny):
    disk = tmp_path / "kv"
    verifier = _disk_verifier(tmp_path, "v1", disk)
    node = Join(tmp_path, "node", verifier.addr, extra=("--no-prefix-cache",))
    try:
        node.ready()
        for i in range(3):
            converse(node, tiny, QUESTIONS[:2], f"{SYSTEM} Conversation {i}.")
        verifier.proc.send_signal(signal.SIGKILL)
        node.proc.kill()
        restarted = _disk_verifier(tmp_path, "v2", disk)
        node = Join(tmp_path, "node2", restarted.addr, extra=("--no-prefix-cache",)).ready()
        for i in range(3):
            converse(node, tiny, QUESTIONS[:2], f"{SYSTEM} Conversation {i}.")
        assert restarted.metric("specedge_kv_disk_restores_total") >= 1
        restarted.kill()
    finally:
        node.proc.kill()
        verifier.kill()


@pytest.mark.slow
def test_a_full_disk_costs_recomputes_not_tokens(tmp_path, tiny):
    """The disk tier on a 64 KiB tmpfs (a private mount namespace): writes fail, the
    verifier counts them and keeps serving exactly."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace (unshare -m) here")
    disk = tmp_path / "small"
    disk.mkdir()
    wrapper = tmp_path / "verifier-on-tmpfs"
    wrapper.write_text(f"#!/bin/sh\nexec unshare -m sh -c 'mount -t tmpfs -o size=64k tmpfs "
                       f"{disk} && exec {script('specedge-verifier')} \"$@\"' sh \"$@\"\n")
    wrapper.chmod(0o755)
    verifier = Verifier(tmp_path, "v", "--no-dht", "--kv-cache-gb", "0.0002",
                        "--kv-disk-dir", str(disk), "--kv-disk-gb", "1", program=str(wrapper))
    node = None
    try:
        verifier.ready()
        node = Join(tmp_path, "node", verifier.addr, extra=("--no-prefix-cache",)).ready()
        for i in range(4):
            converse(node, tiny, QUESTIONS[:2], f"{SYSTEM} Conversation {i}.")
        assert verifier.metric("specedge_kv_disk_write_failures_total") >= 1
        assert verifier.proc.alive()
    finally:
        if node is not None:
            node.proc.kill()
        verifier.kill()
