"""`specedge-verifier serve` as a real process on loopback, driven by real client processes.

Clients are `tests/verifier_client.py` (a minimal node: drafts with tiny-test-draft,
checks every result and receipt). Every wait is bounded and every process is killed on
teardown.
"""

from __future__ import annotations

import json
import signal

import pytest
from netutil import (
    TESTS,
    Proc,
    free_port,
    http_get,
    prometheus_values,
    python_script,
    script,
    spawned,
    wait_until,
)

from specedge.engine import autoregressive_generate
from specedge.models import build_tiny
from specedge.text import encode_prompt

pytestmark = pytest.mark.timeout(240)

CLIENT = TESTS / "verifier_client.py"
START_TIMEOUT = 90.0
CLIENT_TIMEOUT = 150.0
PROMPTS = [
    "def fibonacci(n):", "The quick brown fox", "import numpy as np\n",
    "SELECT name FROM users WHERE", "Once upon a time", "Q: what is 17 * 23?\nA:",
    "x", "Translate to French: good morning", "class Node:",
]


def verifier_args(workdir, metrics_port: int, *extra: str) -> list[str]:
    return [
        script("specedge-verifier"), "serve", "--model", "tiny-test",
        "--listen", "/ip4/127.0.0.1/tcp/0", "--announce-file", str(workdir / "announce"),
        "--identity", str(workdir / "verifier.key"), "--ledger", str(workdir / "ledger.sqlite3"),
        "--spool-dir", str(workdir / "spool"), "--metrics-port", str(metrics_port),
        "--threads", "1", "--max-batch-tokens", "256", "--prefill-chunk", "64",
        "--max-tree-tokens", "32", *extra,
    ]


class Running:
    """A started verifier: its process, first multiaddr and metrics."""

    def __init__(self, proc: Proc, addrs: list[str], metrics_port: int) -> None:
        self.proc = proc
        self.addr = addrs[0]
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def metrics(self) -> dict[str, float]:
        return prometheus_values(http_get(self.metrics_url))


def start_verifier(workdir, name: str = "verifier", *extra: str):
    port = free_port()
    proc = Proc(verifier_args(workdir, port, *extra), workdir, name)
    try:
        addrs = proc.wait_for_file(workdir / "announce", START_TIMEOUT)
    except BaseException:
        proc.kill()
        raise
    assert all(a.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3Koo" in a for a in addrs)
    return Running(proc, addrs, port)


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("verifier")
    running = start_verifier(workdir)
    try:
        yield running
    finally:
        running.proc.kill()


@pytest.fixture(scope="module")
def reference():
    target, tok = build_tiny()

    def greedy(prompt_ids: list[int], n: int) -> list[int]:
        return autoregressive_generate(target, prompt_ids, n).token_ids

    return greedy, tok


def client(workdir, name: str, command: str, addr: str, *args: object) -> Proc:
    return Proc(python_script(CLIENT, command, "--addr", addr, *args), workdir, name)


def result_of(proc: Proc) -> dict:
    rc = proc.wait(CLIENT_TIMEOUT)
    assert rc == 0, proc.describe()
    return json.loads(proc.stdout().strip().splitlines()[-1])


def test_concurrent_sessions_from_several_processes_match_target_greedy(
        verifier, reference, tmp_path):
    greedy, tok = reference
    n = 48
    procs = [
        client(tmp_path, f"client{i}", "generate", verifier.addr, "--max-new-tokens", n,
               "--tree", tree, *(a for p in PROMPTS[3 * i : 3 * i + 3] for a in ("--prompt", p)))
        for i, tree in enumerate(["chain:4", "tree:8,4,2", "chain:6"])
    ]
    try:
        outputs = [result_of(p)["sessions"] for p in procs]
    finally:
        for p in procs:
            p.kill()
    sessions = [s for out in outputs for s in out]
    assert len(sessions) == 9
    for text, s in zip(PROMPTS, sessions, strict=True):
        assert s["prompt"] == encode_prompt(tok, text)
        assert s["tokens"] == greedy(s["prompt"], n), text
    m = verifier.metrics()
    passes = m["specedge_batch_size_count"]
    assert passes - m['specedge_batch_size_bucket{le="1.0"}'] > 0, "no pass held 2+ requests"
    assert m["specedge_spec_decode_num_accepted_tokens_total"] > 0
    assert m["specedge_sessions_open"] == 0


def test_bad_requests_get_their_error_and_change_nothing(verifier, reference, tmp_path):
    greedy, tok = reference
    n = 32
    attacker = client(tmp_path, "attacker", "attack", verifier.addr, "--max-new-tokens", n,
                      "--prompt", PROMPTS[0])
    bystander = client(tmp_path, "bystander", "generate", verifier.addr, "--max-new-tokens", n,
                       "--prompt", PROMPTS[1], "--prompt", PROMPTS[2])
    try:
        attack, normal = result_of(attacker), result_of(bystander)
    finally:
        attacker.kill()
        bystander.kill()
    assert attack["codes"] == {
        "forged_signature": "BAD_SIGNATURE",
        "wrong_peer": "WRONG_PEER",
        "replayed_seq": "REPLAYED_SEQUENCE",
        "skipped_seq": "SKIPPED_SEQUENCE",
        "oversized_tree": "TREE_TOO_LARGE",
        "out_of_vocab": "TOKEN_OUT_OF_VOCAB",
        "bad_tree": "BAD_TREE",
        "unknown_session": "UNKNOWN_SESSION",
        "unexpected_message": "UNEXPECTED_MESSAGE",
        "garbage_bytes": "MALFORMED",
        "verify_before_open": "UNEXPECTED_MESSAGE",
        "wrong_model": "UNSUPPORTED_MODEL",
    }
    # The attacked session itself is unharmed, and so are the others.
    assert attack["tokens"] == greedy(encode_prompt(tok, PROMPTS[0]), n)
    for text, s in zip(PROMPTS[1:3], normal["sessions"], strict=True):
        assert s["tokens"] == greedy(encode_prompt(tok, text), n)
    m = verifier.metrics()
    for code in ("BAD_SIGNATURE", "WRONG_PEER", "MALFORMED", "UNKNOWN_SESSION"):
        assert m[f'specedge_errors_total{{code="{code}"}}'] >= 1


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_vanished_node_is_reaped_and_its_memory_freed(verifier, tmp_path, how):
    base = verifier.metrics()
    holder = client(tmp_path, "holder", "hold", verifier.addr, "--sessions", 2,
                    "--max-new-tokens", 64, "--prompt", PROMPTS[4])
    try:
        holder.wait_for_output("READY", CLIENT_TIMEOUT)
        held = verifier.metrics()
        assert held["specedge_sessions_open"] == base["specedge_sessions_open"] + 2
        assert held["specedge_kv_cache_bytes"] > base["specedge_kv_cache_bytes"]
        # Killed: the OS closes its sockets. Frozen: only the health monitor notices.
        holder.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        wait_until(lambda: verifier.metrics()["specedge_sessions_open"]
                   == base["specedge_sessions_open"], 20.0, f"{how} node's sessions reaped")
        after = verifier.metrics()
        assert after["specedge_kv_cache_bytes"] == base["specedge_kv_cache_bytes"]
    finally:
        holder.kill()


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory):
    """A bootstrap peer process and a verifier that joined the DHT through it."""
    workdir = tmp_path_factory.mktemp("bootstrapped")
    boot_args = [script("python"), "-m", "specedge.protocol.hosts", "--listen",
                 "/ip4/127.0.0.1/tcp/0", "--identity", str(workdir / "boot.key"),
                 "--announce-file", str(workdir / "boot.announce")]
    with spawned(boot_args, workdir, "bootstrap") as boot:
        boot_addr = boot.wait_for_file(workdir / "boot.announce", START_TIMEOUT)[0]
        running = start_verifier(workdir, "verifier", "--bootstrap", boot_addr)
        try:
            yield boot, boot_addr, running, workdir
        finally:
            running.proc.kill()


def test_discovery_through_a_bootstrap_peer(bootstrapped, tmp_path):
    _, boot_addr, running, _ = bootstrapped
    proc = Proc(python_script(CLIENT, "advert", "--discover", boot_addr), tmp_path, "finder")
    try:
        found = result_of(proc)
    finally:
        proc.kill()
    verifier_id = running.addr.rsplit("/p2p/", 1)[1]
    assert found["found"] == [verifier_id]
    assert found["advert"]["model_id"] == "tiny-test"


def test_sigterm_answers_rounds_in_flight_flushes_receipts_and_exits_0(bootstrapped, tmp_path):
    from specedge.ledger import open_ledger

    boot, _, running, workdir = bootstrapped
    holder = client(tmp_path, "busy", "hold", running.addr, "--sessions", 2, "--rounds", -1,
                    "--max-new-tokens", 3000, "--prompt", PROMPTS[5])
    try:
        holder.wait_for_output("READY", CLIENT_TIMEOUT)
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(30) == 0, running.proc.describe()
        out = result_of(holder)
    finally:
        holder.kill()
    # Each session ended with the verifier's refusal, not a dead stream.
    assert out["ended"] == ["SHUTTING_DOWN", "SHUTTING_DOWN"], running.proc.describe()
    # Every result a node received has its receipt in the ledger, none missing.
    with open_ledger(str(workdir / "ledger.sqlite3")) as ledger:
        assert ledger.count_receipts() == out["receipts"] > 0
    assert not list((workdir / "spool").glob("*.rcpt"))
    assert boot.alive()
