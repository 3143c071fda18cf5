"""`specedge-node` and `specedge bootstrap` as real processes on loopback, with the real
`specedge-verifier`: exactness, the OpenAI API through the official client, failover
after SIGKILL with receipts checked, discovery through a bootstrap peer, and the errors
a user sees. Every wait is bounded and every process is stopped by its test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netutil import Proc, free_port

from specedge.engine import autoregressive_generate
from specedge.models import build_tiny
from specedge.text import encode_prompt, eos_ids

BIN = Path(sys.executable).parent
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
START_TIMEOUT = 90.0  # a cold process imports torch and libp2p: seconds on a busy machine


def peer_of(addr: str) -> str:
    return addr.rsplit("/p2p/", 1)[1]


def _has_verifier() -> bool:
    try:
        import specedge.verifier.cli  # noqa: F401
    except ImportError:
        return False
    return (BIN / "specedge-verifier").exists()


class Net:
    """Processes of one test module; all are stopped (SIGKILL if they linger) at the end."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.env = {**os.environ, "XDG_DATA_HOME": str(workdir / "data"),
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs: list[Proc] = []

    def start(self, name: str, *args: str) -> Proc:
        p = Proc([str(a) for a in args], self.dir, name, self.env)
        self.procs.append(p)
        return p

    def start_bootstrap(self) -> tuple[Proc, Path]:
        f = self.dir / "boot.addr"
        return self.start("bootstrap", BIN / "specedge", "bootstrap", "--listen", LOOPBACK,
                          "--identity", self.dir / "boot.key", "--announce-file", f), f

    def start_verifier(self, name: str, *extra: str) -> tuple[Proc, Path]:
        f = self.dir / f"{name}.addr"
        return self.start(name, BIN / "specedge-verifier", "serve", "--model", "tiny-test",
                          "--listen", LOOPBACK, "--announce-file", f,
                          "--identity", self.dir / f"{name}.key",
                          "--ledger", self.dir / f"{name}.sqlite3", "--threads", "1",
                          *extra), f

    def node(self, *args: str, ledger: str = "node", timeout: float = 180
             ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "specedge-node"), *[str(a) for a in args],
             "--identity", str(self.dir / "node.key"),
             "--ledger", str(self.dir / f"{ledger}.sqlite3")],
            capture_output=True, text=True, timeout=timeout, env=self.env)

    def stop_all(self) -> None:
        for p in self.procs:
            p.kill()


@pytest.fixture
def net(tmp_path):
    n = Net(tmp_path)
    yield n
    n.stop_all()


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """A bootstrap peer and two tiny-test verifiers that joined the DHT through it,
    started at once. Shared by the module's tests; the failover test, last, kills one."""
    if not _has_verifier():
        pytest.skip("specedge-verifier not built")
    n = Net(tmp_path_factory.mktemp("network"))
    try:
        boot, boot_file = n.start_bootstrap()
        n.boot = boot.wait_for_file(boot_file, START_TIMEOUT)
        started = [n.start_verifier(name, "--bootstrap", n.boot[0]) for name in ("va", "vb")]
        n.verifiers = {}
        for proc, f in started:
            n.verifiers[peer_of(proc.wait_for_file(f, START_TIMEOUT)[0])] = proc
        yield n
    finally:
        n.stop_all()


@pytest.fixture(scope="module")
def tiny_target():
    return build_tiny()


def greedy(tiny_target, prompt: str, n: int, chat: bool = False) -> tuple[list[int], str]:
    target, tok = tiny_target
    ids = encode_prompt(tok, prompt, chat)
    out = autoregressive_generate(target, ids, n, eos_ids=eos_ids(tok, target.generation_config))
    return out.token_ids, tok.decode(out.token_ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------- user errors


def test_malformed_bootstrap_is_a_clear_error(net):
    res = net.node("generate", "--bootstrap", "/ip4/127.0.0.1/tcp/4001", "--prompt", "x",
                   timeout=60)
    assert res.returncode == 2, res.stderr
    assert "malformed bootstrap address" in res.stderr and "Traceback" not in res.stderr


def test_unreachable_bootstrap_is_a_clear_error(net):
    port = free_port()
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    res = net.node("generate", "--bootstrap", addr, "--prompt", "x", timeout=60)
    assert res.returncode == 2, res.stderr
    assert "no bootstrap peer could be reached" in res.stderr
    assert "Traceback" not in res.stderr


def test_no_verifier_for_the_model_is_a_clear_error(network):
    res = network.node("generate", "--bootstrap", network.boot[0], "--listen", LOOPBACK,
                       "--target-id", "no-such-model", "--prompt", "x", "--max-new-tokens", "4")
    assert res.returncode == 2, res.stderr
    assert "no verifier for 'no-such-model' was found" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.demo_models
def test_vocabulary_mismatch_is_a_clear_error(network):
    from specedge.weights import is_prepared

    if not is_prepared("qwen2.5-coder-1.5b"):
        pytest.skip("demo models not prepared")
    res = network.node("generate", "--bootstrap", network.boot[0], "--listen", LOOPBACK,
                       "--target-model", "qwen2.5-coder-1.5b", "--draft-model",
                       "tiny-test-draft", "--prompt", "x")
    assert res.returncode == 2, res.stderr
    assert "vocabulary mismatch" in res.stderr and "Traceback" not in res.stderr


def test_bad_parameters_are_clear_errors(net):
    addr = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    res = net.node("generate", "--bootstrap", addr, "--prompt", "x", "--top-p", "2", timeout=60)
    assert res.returncode == 2 and "top_p" in res.stderr
    res = net.node("join", "--bootstrap", "x", "--api", "localhost", timeout=60)
    assert res.returncode == 2 and "malformed bootstrap" in res.stderr


# ---------------------------------------------------------------------------- with verifiers


def test_generate_via_bootstrap_peer_equals_target_only(network, tiny_target):
    """Discovery through a bootstrap peer that is neither node nor verifier, then a
    generation whose tokens are the target's own greedy tokens."""
    prompt = "def fibonacci(n):"
    res = network.node("generate", "--bootstrap", network.boot[0], "--listen", LOOPBACK,
                       "--prompt", prompt, "--max-new-tokens", "48", "--json", ledger="gen")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    ids, text = greedy(tiny_target, prompt, 48)
    assert out["token_ids"] == ids and out["text"] == text
    s = out["stats"]
    assert len(s["verifiers"]) == 1 and s["verifiers"][0] in network.verifiers
    assert s["failovers"] == 0
    for key in ("rounds", "acceptance", "proactive_hits", "proactive_bets",
                "time_to_first_token_ms", "inter_token_latency_ms", "mean_accepted_length"):
        assert key in s
    assert s["time_to_first_token_ms"] > 0 and s["inter_token_latency_ms"] > 0
    # The first token came with the verifier's prefill: one receipt for it (no drafts),
    # then one per drafted round.
    assert s["first_token_from_prefill"] is True
    assert out["receipts"][0]["drafted"] == 0 and out["receipts"][0]["accepted"] == 0
    assert len(out["receipts"]) == s["rounds"] + 1
    assert sum(r["accepted"] for r in out["receipts"]) == s["accepted"]

    from specedge.ledger import open_ledger

    with open_ledger(str(network.dir / "gen.sqlite3")) as ledger:
        assert ledger.count_receipts() == s["rounds"] + 1
        assert ledger.balance(out["node"]).balance == s["accepted"]


def test_join_serves_the_openai_api(network, tiny_target):
    import openai

    url_file = network.dir / "api.url"
    join = network.start("join", BIN / "specedge-node", "join", "--bootstrap", network.boot[0],
                         "--listen", LOOPBACK, "--api", "127.0.0.1:0", "--announce-file",
                         url_file, "--identity", network.dir / "node.key", "--ledger",
                         network.dir / "join.sqlite3")
    url = join.wait_for_file(url_file, START_TIMEOUT)[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny-test"]

    prompt = "The quick brown fox"
    res = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=32,
                                    temperature=0)
    assert res.choices[0].text == greedy(tiny_target, prompt, 32)[1]

    chunks = list(client.chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": "hello"}], max_tokens=24,
        temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert text == greedy(tiny_target, "hello", 24, chat=True)[1]

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-test", prompt="x", temperature=-1)
    assert join.stop() == 0, join.describe()
    assert "Traceback" not in join.stderr()


def test_failover_after_sigkill(network, tiny_target):
    """The verifier in use is SIGKILLed mid-generation: the output is the same, the user
    is told, and the node's receipts cover each token exactly once. (Last in the module:
    it kills one of the shared verifiers.)"""
    from specedge.ledger import open_ledger
    from specedge.protocol.envelopes import open_receipt, open_request

    prompt, n = "import numpy as np\n", 400
    ids, text = greedy(tiny_target, prompt, n)
    assert len(ids) == n  # no early end-of-sequence: the kill lands mid-generation
    node = network.start("node", BIN / "specedge-node", "generate", "--bootstrap",
                         network.boot[0], "--listen", LOOPBACK, "--prompt", prompt,
                         "--max-new-tokens", str(n), "-v", "--identity",
                         network.dir / "node.key", "--ledger", network.dir / "fail.sqlite3")
    deadline = time.monotonic() + START_TIMEOUT
    victim = None
    while time.monotonic() < deadline and node.alive():
        err = node.stderr()
        if victim is None and "took the generation" in err:
            victim = err.split(" took the generation")[0].split()[-1]
        if victim is not None and len(node.stdout()) >= 40:
            network.verifiers[victim].kill()
            break
        time.sleep(0.02)
    assert victim in network.verifiers, node.describe()
    assert node.wait(120) == 0, node.describe()
    assert node.stdout() == text + "\n"
    err = node.stderr()
    assert f"verifier {victim} failed" in err and "failing over" in err
    assert " 1 failovers" in err and "continuing on verifier" in err

    with open_ledger(str(network.dir / "fail.sqlite3")) as ledger:
        pairs = list(ledger.iter_receipt_pairs())
    pos, verifiers = 0, []
    for receipt_env, request_env in pairs:
        _, receipt = open_receipt(receipt_env)
        _, req = open_request(request_env)
        want = ids[pos: pos + receipt.accepted]  # the last round may run past n
        assert list(req.tokens[: receipt.accepted])[: len(want)] == want
        pos += receipt.accepted + 1
        if not verifiers or verifiers[-1] != receipt.verifier_peer_id:
            verifiers.append(receipt.verifier_peer_id)
    assert verifiers[0] == victim and len(verifiers) == 2  # both did work, in that order
    assert pos >= n and pos - (receipt.accepted + 1) < n


@pytest.mark.slow
def test_failover_when_the_verifier_freezes(net, tiny_target):
    """SIGSTOP: the verifier neither answers nor closes. The node gives up on it (round
    timeout or the connection's health check) and finishes elsewhere, same output."""
    started = [net.start_verifier(name, "--no-dht") for name in ("fa", "fb")]
    addrs, full = {}, []
    for proc, f in started:
        full.append(proc.wait_for_file(f, START_TIMEOUT)[0])
        addrs[peer_of(full[-1])] = proc
    prompt, n = "x", 300
    ids, text = greedy(tiny_target, prompt, n)
    args = [BIN / "specedge-node", "generate", "--listen", LOOPBACK, "--prompt", prompt,
            "--max-new-tokens", str(n), "--silence-timeout", "3", "-v", "--json",
            "--identity", net.dir / "node.key", "--ledger", net.dir / "node.sqlite3"]
    for addr in full:
        args += ["--verifier", addr]
    node = net.start("node", *args)
    deadline = time.monotonic() + START_TIMEOUT
    victim = None
    while time.monotonic() < deadline and node.alive() and victim is None:
        err = node.stderr()
        if "took the generation" in err:
            victim = err.split(" took the generation")[0].split()[-1]
        time.sleep(0.02)
    assert victim in addrs, node.describe()
    addrs[victim].send_signal(signal.SIGSTOP)
    try:
        assert node.wait(120) == 0, node.describe()
    finally:
        addrs[victim].send_signal(signal.SIGCONT)
    out = json.loads(node.stdout())
    assert out["token_ids"] == ids and out["text"] == text
    assert out["stats"]["failovers"] == 1, node.describe()
    assert f"verifier {victim} failed" in node.stderr()
