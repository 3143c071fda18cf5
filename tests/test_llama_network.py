"""The network tests, on a verifier serving the tiny-test GGUF with `--engine llama.cpp`.

Real `specedge-verifier` and `specedge-node` processes on loopback, as for the torch
engine (test_verifier_network, test_faults, test_hostile): concurrent nodes get exactly
llama.cpp's own greedy output of the served file; a verifier killed mid-generation loses
nothing (the node fails over to a second llama.cpp verifier); every hostile input gets its
answer while honest sessions run unchanged. The nodes draft with the torch tiny-test-draft:
engines meet only on the wire. Failover and hostile input are `slow` (a minute or more
each); `make test-slow` runs them.
"""

from __future__ import annotations

import pytest
from faultutil import Verifier, json_result, node_generate, start_verifiers
from netutil import wait_until

from specedge.llama import unavailable

pytestmark = [pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
              pytest.mark.timeout(300)]

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import numpy as np\n"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    from specedge.ggufs import tiny_gguf
    from specedge.models import TINY_TARGET

    return tiny_gguf(TINY_TARGET, tmp_path_factory.mktemp("gguf"))


def llama_args(gguf) -> list[str]:
    return ["--engine", "llama.cpp", "--model", str(gguf), "--model-id", "tiny-test",
            "--no-dht"]


@pytest.fixture(scope="module")
def greedy(gguf):
    """llama.cpp's own greedy decoding of the served file: the reference."""
    from specedge.llama import LlamaModel, greedy_decode
    from specedge.models import build_tiny
    from specedge.text import encode_prompt, eos_ids

    model = LlamaModel(gguf)
    target, tok = build_tiny()
    eos = eos_ids(tok, target.generation_config)
    cache: dict[tuple[str, int, bool], list[int]] = {}

    def run(prompt: str, n: int, stop: bool = True) -> list[int]:
        """`stop`: end at an end-of-sequence token, as a node does."""
        if (prompt, n, stop) not in cache:
            ids = encode_prompt(tok, prompt)
            tokens, margins = greedy_decode(model, ids, n, eos if stop else (), threads=1)
            cache[prompt, n, stop] = tokens
            run.margins[tuple(tokens)] = margins
        return cache[prompt, n, stop]

    run.margins = {}

    yield run
    model.close()


def test_concurrent_nodes_get_llama_greedy_output(tmp_path, gguf, greedy, monkeypatch):
    """Three nodes at once, drafting on torch, on llama.cpp and on whichever they measure
    faster (the children write the tiny draft GGUF into this test's cache)."""
    monkeypatch.setenv("SPECEDGE_CACHE", str(tmp_path / "cache"))
    (v,) = start_verifiers(tmp_path, ["v"], *llama_args(gguf))
    n = 64
    engines = ["torch", "llama.cpp", "auto"]
    try:
        nodes = [node_generate(tmp_path, f"node{i}", p, n, verifiers=[v.addr],
                               extra=["--engine", engine])
                 for i, (p, engine) in enumerate(zip(PROMPTS, engines, strict=True))]
        try:
            outs = [json_result(node) for node in nodes]
        finally:
            for node in nodes:
                node.kill()
        for prompt, out in zip(PROMPTS, outs, strict=True):
            want = greedy(prompt, n)
            assert out["token_ids"] == want, (prompt, divergence(out["token_ids"], want, greedy))
        m = v.metrics()
        print(f"passes {m.get('specedge_batch_passes_total')}, "
              f"drafts {m.get('specedge_spec_decode_num_drafts_total')}")
        assert m.get("specedge_spec_decode_num_accepted_tokens_total", 0) > 0
    finally:
        v.kill()


@pytest.mark.slow
def test_verifier_killed_mid_generation_loses_nothing(tmp_path, gguf, greedy):
    prompt, n = "import numpy as np\n", 300
    ids = greedy(prompt, n)
    verifiers = start_verifiers(tmp_path, ["v0", "v1"], *llama_args(gguf))
    try:
        node = node_generate(tmp_path, "node", prompt, n,
                             verifiers=[v.addr for v in verifiers],
                             extra=["--silence-timeout", "5"])
        try:
            victim = _in_use(verifiers)
            victim.proc.kill()
            out = json_result(node)
        finally:
            node.kill()
        assert out["token_ids"] == ids, node.describe()
        assert out["stats"]["failovers"] == 1, node.describe()
        assert out["stats"]["verifiers"][0] == victim.peer
    finally:
        for v in verifiers:
            v.kill()


def divergence(got: list[int], want: list[int], greedy) -> str:
    """Where `got` leaves the reference, and the reference's logit margin there."""
    at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
              None)
    if at is None:
        return f"lengths {len(got)} and {len(want)}"
    margin = greedy.margins[tuple(want)][at]
    return f"token {at}: {got[at]} for {want[at]}, reference margin {margin:.6f}"


def _in_use(verifiers: list[Verifier], timeout: float = 120.0) -> Verifier:
    def find() -> Verifier | None:
        for v in verifiers:
            m = v.metrics()
            if m.get("specedge_sessions_open", 0) >= 1 and m.get(
                    "specedge_spec_decode_num_drafts_total", 0) >= 5:
                return v
        return None

    return wait_until(find, timeout, "a verifier serving the node", interval=0.02)


@pytest.mark.slow
def test_hostile_input_gets_its_answer_while_honest_sessions_run(tmp_path, gguf, greedy):
    import test_hostile as th

    v = Verifier(tmp_path, "target", *llama_args(gguf), "--idle-timeout", str(th.IDLE),
                 "--max-sessions", str(th.MAX_SESSIONS),
                 "--max-sessions-per-peer", str(th.PER_PEER)).ready()
    try:
        n = 300
        honest = th.honest_client(tmp_path, "honest", v.addr, n, PROMPTS[:2])
        try:
            wait_until(lambda: v.metric("specedge_sessions_open") >= 2, 120, "honest sessions")
            results = th.hp.run(th.all_attacks, v.addr, 1)
            sessions = th.honest_result(honest)
        finally:
            honest.kill()
        print("\n" + th._table(results))
        assert not th._problems(results), "\n".join(th._problems(results))
        for text, s in zip(PROMPTS, sessions, strict=False):
            want = greedy(text, n, stop=False)
            assert s["tokens"] == want, (text, divergence(s["tokens"], want, greedy))
        wait_until(lambda: v.metric("specedge_sessions_open") == 0, 30, "sessions reaped")
        assert v.metric("specedge_kv_cache_bytes") == 0
        assert v.proc.alive()
    finally:
        v.kill()
