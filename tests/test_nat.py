"""Hosts behind NAT, in network namespaces (tests/netns.py): a verifier behind one NAT
router, a node behind another, the bootstrap/relay peer on the "internet" between them.

Real processes throughout (`specedge bootstrap --relay`, `specedge-verifier serve`,
`specedge-node generate`), addresses only inside the namespaces each test made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import NatTopology, Netns, in_ns, made
from netutil import Proc, wait_until

from specedge.engine import autoregressive_generate
from specedge.models import build_tiny
from specedge.text import encode_prompt, eos_ids

BIN = Path(sys.executable).parent
START_TIMEOUT = 120.0
PROMPT = "The relay carries every byte until the hole is punched"


@pytest.fixture
def nat():
    with made(NatTopology) as topo:
        yield topo


@pytest.fixture
def lan():
    with made(Netns, "lan") as topo:
        yield topo


@pytest.fixture(scope="module")
def tiny_target():
    return build_tiny()


def greedy(tiny_target, prompt: str, n: int) -> list[int]:
    target, tok = tiny_target
    ids = encode_prompt(tok, prompt, False)
    return autoregressive_generate(target, ids, n, eos_ids=eos_ids(
        tok, target.generation_config)).token_ids


class Procs:
    def __init__(self, workdir: Path, netns) -> None:
        self.dir = workdir
        self.netns = netns
        self.env = {**os.environ, "XDG_DATA_HOME": str(workdir / "data"),
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs: list[Proc] = []

    def start(self, ns: str, name: str, *args: object) -> Proc:
        p = Proc(in_ns(self.netns, ns, [str(a) for a in args]), self.dir, name, self.env)
        self.procs.append(p)
        return p

    def bootstrap(self, name: str, listen: list[str], *extra: str) -> tuple[Proc, list[str]]:
        f = self.dir / f"{name}.addr"
        args = [BIN / "specedge", "bootstrap", "--relay", "--identity", self.dir / f"{name}.key",
                "--announce-file", f, *extra]
        for a in listen:
            args += ["--listen", a]
        p = self.start("wan", name, *args)
        return p, p.wait_for_file(f, START_TIMEOUT)

    def verifier(self, ns: str, listen: str, *extra: str) -> tuple[Proc, list[str], Path]:
        f, status = self.dir / "verifier.addr", self.dir / "verifier.status.json"
        p = self.start(ns, "verifier", BIN / "specedge-verifier", "serve", "--model",
                       "tiny-test", "--listen", listen, "--announce-file", f, "--identity",
                       self.dir / "verifier.key", "--no-ledger", "--threads", "1",
                       "--status-file", status, *extra)
        return p, p.wait_for_file(f, START_TIMEOUT), status

    def node(self, ns: str, *args: object, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            in_ns(self.netns, ns, [BIN / "specedge-node", "generate", *args, "--identity",
                                   self.dir / "node.key", "--no-ledger", "--json",
                                   "--listen", "/ip4/0.0.0.0/tcp/0"]),
            capture_output=True, text=True, timeout=timeout, env=self.env)

    def stop_all(self) -> None:
        for p in self.procs:
            p.kill()


def status_of(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_verifier_behind_nat_serves_through_the_relay(nat: NatTopology, tiny_target,
                                                       tmp_path) -> None:
    """The verifier learns it is not reachable (the dial-back fails), reserves a slot on
    the relay and advertises its circuit address in the DHT; the node, behind another
    NAT, finds it there, connects through the relay, and the output is target greedy."""
    procs = Procs(tmp_path, nat)
    try:
        _, boot = procs.bootstrap("relay", [f"/ip4/{nat.WAN_A}/tcp/4000",
                                            f"/ip4/{nat.WAN_B}/tcp/4000"])
        vproc, vaddrs, status_file = procs.verifier(
            "a", f"/ip4/{NatTopology.HOST_A}/tcp/4001", "--bootstrap", boot[0])
        assert any("/p2p-circuit/" in a for a in vaddrs), vaddrs
        status = wait_until(lambda: status_of(status_file).get("dht", {}).get("found"),
                            30, "the DHT record check") and status_of(status_file)
        assert status["reachability"] == "relayed", status
        assert "could not dial back TCP port(s) 4001" in status["dialback"]
        assert status["relay"]["peer"] == boot[0].rsplit("/p2p/", 1)[1]
        assert "forward TCP port 4001" in status["advice"] and "10.88.1.2:4001" in status[
            "advice"]
        n = 24
        res = procs.node("b", "--bootstrap", boot[1], "--prompt", PROMPT,
                         "--max-new-tokens", n, "-v")
        assert res.returncode == 0, res.stderr[-3000:] + vproc.describe()
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["token_ids"] == greedy(tiny_target, PROMPT, n)
        assert "through a relay" in res.stderr, res.stderr[-2000:]
        # Whether DCUtR turned the relayed connection into a direct one: reported, not
        # required (two MASQUERADE routers usually allow it; py-libp2p's DCUtR may not).
        time.sleep(2.5)
        conns = status_of(status_file).get("connections", {})
        print("verifier's connections after the generation:", conns)
    finally:
        procs.stop_all()
