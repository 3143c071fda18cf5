"""Audits with real processes: honest verifiers, cheating verifiers, a node that audits.

Every verifier here is a `specedge-verifier serve` process; the cheaters are the same
daemon with one piece swapped (tests/cheating_verifier.py) or serving the draft model
under the target's name. The node is `specedge-node generate`, pointed at all of them
and told to prefer the cheater, so the cheater serves the session and the honest ones
audit it. Each proof is checked again by a separate `specedge-ledger` process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from faultutil import Join, Verifier, node_generate
from netutil import TESTS, wait_until

from specedge.engine import autoregressive_generate
from specedge.models import build_tiny
from specedge.text import encode_prompt, eos_ids

PROMPT = "def fibonacci(n):"
N = 24
CLIENT_TIMEOUT = 300.0  # a node that audits waits for its replays too


@pytest.fixture(scope="module")
def greedy():
    """Target-only greedy output (float32: bit-exact)."""
    target, tok = build_tiny()
    eos = eos_ids(tok, target.generation_config)

    def run(prompt: str, n: int) -> list[int]:
        return autoregressive_generate(target, encode_prompt(tok, prompt), n,
                                       eos_ids=eos).token_ids

    return run


def cheater(workdir: Path, name: str, mode: str, *extra: str) -> Verifier:
    """A verifier process running tests/cheating_verifier.py MODE."""
    wrapper = workdir / f"{name}.sh"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{TESTS / "cheating_verifier.py"}" '
                       f'{mode} "$@"\n')
    wrapper.chmod(0o755)
    return Verifier(workdir, name, "--no-dht", *extra, program=str(wrapper))


def network(workdir: Path, bad: Verifier, *extra: str) -> list[Verifier]:
    """Two honest verifiers and `bad`, all started at once, all ready."""
    started = [Verifier(workdir, "honest1", "--no-dht", *extra),
               Verifier(workdir, "honest2", "--no-dht", *extra), bad]
    try:
        return [v.ready() for v in started]
    except BaseException:
        for v in started:
            v.kill()
        raise


def generate(workdir: Path, name: str, verifiers: list[Verifier], prefer: Verifier,
             *extra: str, prompt: str = PROMPT, n: int = N) -> dict:
    proc = node_generate(workdir, name, prompt, n, verifiers=[v.addr for v in verifiers],
                         extra=["--prefer-verifier", prefer.peer,
                                "--proof-dir", str(workdir / "proofs"), *extra])
    rc = proc.wait(CLIENT_TIMEOUT)
    assert rc == 0, proc.describe()
    return json.loads(proc.stdout().strip().splitlines()[-1])


def ledger_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specedge.ledger.cli", *args],
                          capture_output=True, text=True, timeout=120)


def assert_proven(workdir: Path, accused: Verifier, node_ledger: Path) -> None:
    """Each proof file checks in a process of its own, and the node's ledger holds it."""
    files = sorted((workdir / "proofs").glob("fraud-*.pb"))
    assert files, "no fraud proof was written"
    for f in files:
        out = ledger_cli("frauds", str(f), "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout)["accused"] == accused.peer
    out = ledger_cli("--ledger", str(node_ledger), "verify", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["proofs"] >= 1, out.stdout
    rows = json.loads(ledger_cli("--ledger", str(node_ledger), "frauds", "--json").stdout)
    assert {r["accused"] for r in rows} == {accused.peer}


def test_sync_audits_keep_the_output_exact_and_convict_a_lazy_verifier(greedy, tmp_path):
    """--audit-sync: a verifier that accepts every draft token is caught on its first
    round, proven, banned; the round is re-verified elsewhere, so the whole output is
    the target's own."""
    vs = network(tmp_path, cheater(tmp_path, "lazy", "accept-all"))
    try:
        out = generate(tmp_path, "node", vs, vs[2], "--audit-sync")
    finally:
        for v in vs:
            v.kill()
    assert out["token_ids"] == greedy(PROMPT, N)
    audits = out["audits"]
    assert audits["frauds"] == 1 and list(audits["banned"]) == [vs[2].peer]
    assert out["stats"]["failovers"] == 1
    assert_proven(tmp_path, vs[2], tmp_path / "node.sqlite3")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["accept-all", "other-model", "sometimes"])
def test_async_audits_catch_each_cheater_and_later_output_is_exact(greedy, tmp_path, mode):
    """Default (background) audits: the cheated session is audited after it ends and the
    proof made; the node's next generation avoids the cheater (banned through its
    ledger) and is exact."""
    if mode == "other-model":
        bad = Verifier(tmp_path, "cheat", "--no-dht", "--model", "tiny-test-draft",
                       "--model-id", "tiny-test")
    else:
        bad = cheater(tmp_path, "cheat", mode)
    vs = network(tmp_path, bad)
    try:
        prompts = ["def fibonacci(n):", "The quick brown fox", "class Node:",
                   "import numpy as np\n", "Once upon a time"]
        frauds, tries = 0, 0
        while not frauds and tries < len(prompts):  # "sometimes" may need a few sessions
            out = generate(tmp_path, "node", vs, vs[2], prompt=prompts[tries], n=32)
            frauds, tries = out["audits"]["frauds"], tries + 1
        assert frauds == 1, out
        after = generate(tmp_path, "node", vs, vs[2])
    finally:
        for v in vs:
            v.kill()
    assert vs[2].peer not in after["stats"]["verifiers"]
    assert after["token_ids"] == greedy(PROMPT, N)
    assert after["audits"]["frauds"] == 0
    assert_proven(tmp_path, vs[2], tmp_path / "node.sqlite3")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_honest_network_is_never_accused(greedy, tmp_path, dtype):
    """Three honest verifiers, the default adaptive rate (every session of a new verifier
    is audited), several sessions: no fraud, no dispute; in bf16 the differing positions
    are near-ties, excused and counted."""
    vs = network(tmp_path, Verifier(tmp_path, "honest3", "--no-dht", "--dtype", dtype),
                 "--dtype", dtype)
    outs = []
    try:
        for i, prompt in enumerate(["def fibonacci(n):", "The quick brown fox",
                                    "SELECT name FROM users WHERE", "x"]):
            outs.append((prompt, generate(tmp_path, f"node{i}", vs, vs[i % 3],
                                          "--dtype", dtype, prompt=prompt, n=32)))
        audited = sum(v.metric("specedge_audits_served_total") for v in vs)
    finally:
        for v in vs:
            v.kill()
    for prompt, out in outs:
        a = out["audits"]
        assert a["frauds"] == 0 and a["disputes"] == 0 and a["sessions_audited"] >= 1, a
        if dtype == "float32":
            assert out["token_ids"] == greedy(prompt, 32)
    assert audited >= len(outs)


@pytest.mark.slow
def test_a_proof_gossiped_on_the_network_protects_another_node(greedy, tmp_path):
    """Node 2 runs (and prefers the cheater) while node 1 convicts it: node 2 hears the
    proof on the fraud topic, checks it, keeps it and never uses the cheater."""
    vs = network(tmp_path, cheater(tmp_path, "lazy", "accept-all"))
    other = None
    try:
        other = Join(tmp_path, "node2", *[v.addr for v in vs],
                     extra=("--prefer-verifier", vs[2].peer)).ready()
        out = generate(tmp_path, "node1", vs, vs[2], "--audit-sync")
        assert out["audits"]["frauds"] == 1

        def heard() -> bool:
            res = ledger_cli("--ledger", str(tmp_path / "node2.sqlite3"), "frauds", "--json")
            return res.returncode == 0 and any(r["accused"] == vs[2].peer
                                               for r in json.loads(res.stdout or "[]"))

        wait_until(heard, 60, "node 2 to hear the proof", interval=1.0)
        res = other.complete(PROMPT, N).json()
        assert vs[2].peer not in res["specedge"]["verifiers"]
        assert res["specedge"]["token_ids"] == greedy(PROMPT, N)
    finally:
        if other is not None:
            other.proc.kill()
        for v in vs:
            v.kill()
