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
from netns import NatTopology, Netns, delay_forwarder, in_ns, made
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


def relay_of(stderr: str) -> str | None:
    """The relay's peer id from the node's "connected ... through a relay (addr)" line."""
    for line in stderr.splitlines():
        if "through a relay (" in line:
            return line.split("through a relay (", 1)[1].split("/p2p/")[1].split("/")[0]
    return None


def node_popen(procs: Procs, ns: str, workdir: Path, *args: object) -> Proc:
    return procs.start(ns, "node", BIN / "specedge-node", "generate", *args, "--identity",
                       workdir / "node.key", "--no-ledger", "--json", "--listen",
                       "/ip4/0.0.0.0/tcp/0", "-v")


def test_verifier_behind_nat_serves_through_the_relay(nat: NatTopology, tiny_target,
                                                       tmp_path) -> None:
    """The verifier learns it is not reachable (the dial-back fails), reserves a slot on
    the relay and advertises its circuit address in the DHT; the node, behind another
    NAT, finds it there, connects through the relay, and the output is target greedy.
    DCUtR then punches a direct connection through the two NATs (they allow it: both
    keep the source port and drop, rather than refuse, unsolicited SYNs)."""
    procs = Procs(tmp_path, nat)
    try:
        _, boot = procs.bootstrap("relay", [f"/ip4/{nat.WAN_A}/tcp/4000",
                                            f"/ip4/{nat.WAN_B}/tcp/4000"])
        vproc, vaddrs, status_file = procs.verifier(
            "a", f"/ip4/{NatTopology.HOST_A}/tcp/4001", "--bootstrap", boot[0],
            "--test-pass-delay", "0.15")  # a generation of seconds on any machine
        assert any("/p2p-circuit/" in a for a in vaddrs), vaddrs
        status = wait_until(lambda: status_of(status_file).get("dht", {}).get("found"),
                            30, "the DHT record check") and status_of(status_file)
        assert status["reachability"] == "relayed", status
        assert "could not dial back TCP port(s) 4001" in status["dialback"]
        assert [r["peer"] for r in status["relays"]] == [boot[0].rsplit("/p2p/", 1)[1]]
        assert "forward TCP port 4001" in status["advice"] and "10.88.1.2:4001" in status[
            "advice"]
        n = 128  # with the pass delay, long enough for DCUtR (about 5 s) to happen during it
        node = node_popen(procs, "b", tmp_path, "--bootstrap", boot[1], "--prompt", PROMPT,
                          "--max-new-tokens", n)
        seen: set[str] = set()
        while node.popen.poll() is None:
            conns = status_of(status_file).get("connections", {})
            seen |= {path for peer, path in conns.items() if peer not in boot[0]}
            time.sleep(0.3)
        assert node.popen.returncode == 0, node.stderr()[-3000:] + vproc.describe()
        out = json.loads(node.stdout().strip().splitlines()[-1])
        assert out["token_ids"] == greedy(tiny_target, PROMPT, n)
        assert relay_of(node.stderr()) == boot[0].rsplit("/p2p/", 1)[1], node.stderr()[-2000:]
        print(f"\nthe verifier saw the node's connection as {sorted(seen)}; "
              f"{out['stats']['failovers']} failovers")
        assert "direct" in seen, f"DCUtR did not upgrade the relayed connection: {seen}"
    finally:
        procs.stop_all()


@pytest.mark.slow
def test_relay_dies_mid_generation(nat: NatTopology, tiny_target, tmp_path) -> None:
    """Two relays; the one carrying the session is killed mid-generation: the verifier
    keeps its other slot and takes no new one from the dead relay, the node reconnects
    to the same verifier through the other relay, and the output is still exact."""
    procs = Procs(tmp_path, nat)
    try:
        _, boot = procs.bootstrap("boot", [f"/ip4/{nat.WAN_A}/tcp/4000"])
        relays = {}
        for name, port in (("r1", 4100), ("r2", 4200)):
            proc, addrs = procs.bootstrap(name, [f"/ip4/{nat.WAN_A}/tcp/{port}"],
                                          "--bootstrap", boot[0])
            relays[addrs[0].rsplit("/p2p/", 1)[1]] = (proc, addrs[0])
        vproc, _, status_file = procs.verifier(
            "a", f"/ip4/{NatTopology.HOST_A}/tcp/4001", "--bootstrap", boot[0],
            "--no-hole-punch", "--test-pass-delay", "0.1",  # a generation of seconds
            *[x for _, a in relays.values() for x in ("--relay", a)])
        wait_until(lambda: len(status_of(status_file).get("relays", [])) == 2, 30,
                   "slots on both relays")
        n = 200
        node = node_popen(procs, "b", tmp_path, "--bootstrap", boot[0], "--prompt", PROMPT,
                          "--max-new-tokens", n)
        used = wait_until(lambda: relay_of(node.stderr()), 120, "a relayed connection")
        wait_until(lambda: "took the generation" in node.stderr(), 60, "the session")
        relays[used][0].kill()
        assert node.wait(180) == 0, node.stderr()[-3000:] + vproc.describe()
        out = json.loads(node.stdout().strip().splitlines()[-1])
        assert out["token_ids"] == greedy(tiny_target, PROMPT, n)
        assert out["stats"]["failovers"] >= 1 and out["stats"]["verifiers"] == [
            vproc_peer(status_file)], out["stats"]
        assert "still there" in node.stderr()
        left = [r["peer"] for r in status_of(status_file)["relays"]]
        assert used not in left and left, left
    finally:
        procs.stop_all()


def vproc_peer(status_file: Path) -> str:
    return status_of(status_file)["addrs"][0].rsplit("/p2p/", 1)[1]


@pytest.mark.slow
@pytest.mark.parametrize("rtt_ms", [14, 50])
def test_added_round_trip_keeps_the_output_and_shows_in_the_stats(lan: Netns, tiny_target,
                                                                  tmp_path, rtt_ms) -> None:
    """Node and verifier with `rtt_ms` of round trip between them (the delaying
    forwarder inside a namespace of the test's own): exact output; the node's stats show
    the round trip."""
    procs = Procs(tmp_path, lan)
    try:
        _, vaddrs, _ = procs.verifier("lan", "/ip4/127.0.0.1/tcp/4001", "--no-dht")
        port_file = tmp_path / "delay.port"
        procs.procs.append(Proc(delay_forwarder(lan, "lan", "127.0.0.1:0", "127.0.0.1:4001",
                                                rtt_ms, port_file), tmp_path, "delay",
                                procs.env))
        port = int(wait_until(lambda: port_file.exists() and port_file.read_text().strip(),
                              30, "the forwarder"))
        peer = vaddrs[0].rsplit("/p2p/", 1)[1]
        n = 32
        res = procs.node("lan", "--verifier", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}",
                         "--prompt", PROMPT, "--max-new-tokens", n)
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["token_ids"] == greedy(tiny_target, PROMPT, n)
        assert out["stats"]["mean_round_trip_ms"] >= rtt_ms, out["stats"]
        print(f"\nadded {rtt_ms} ms: mean round trip {out['stats']['mean_round_trip_ms']} ms, "
              f"inter-token {out['stats']['inter_token_latency_ms']} ms")
    finally:
        procs.stop_all()


def test_relay_limits_cut_off_a_hog() -> None:
    """A relay with small limits: a third peer gets no slot, a second circuit to one slot
    holder is refused, and a circuit that carries more than its byte limit is cut."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import PeerInfo
    from multiaddr import Multiaddr

    from specedge.protocol import hosts, relay

    limits = relay.RelayLimitsConfig(max_reservations=2, max_circuits=1,
                                     max_circuit_bytes=256 * 1024, max_circuit_seconds=60)
    loop = ["/ip4/127.0.0.1/tcp/0"]

    async def sink(stream) -> None:
        try:
            while await stream.read(65536):
                pass
        except Exception:
            pass

    async def main() -> None:
        with trio.fail_after(60):
            async with hosts.running_host(create_new_key_pair(), loop) as r, \
                    relay.relay_service(r, limits), \
                    hosts.running_host(create_new_key_pair(), loop) as a, \
                    hosts.running_host(create_new_key_pair(), loop) as b, \
                    hosts.running_host(create_new_key_pair(), loop) as c, \
                    hosts.running_host(create_new_key_pair(), loop) as d, \
                    hosts.running_host(create_new_key_pair(), loop) as e, \
                    relay.relay_client(a, hole_punch=False), \
                    relay.relay_client(d, hole_punch=False), \
                    relay.relay_client(e, hole_punch=False):
                rinfo = hosts.parse_peer_addr(hosts.peer_addrs(r)[0])
                a.set_stream_handler("/sink/1", sink)
                _, circuits = await relay.reserve(a, rinfo)
                await relay.reserve(b, rinfo)
                with pytest.raises(ConnectionError, match="refused a slot"):
                    await relay.reserve(c, rinfo)  # the third slot: over max_reservations
                target = PeerInfo(a.get_id(), [Multiaddr(f"{circuits[0]}/p2p/{a.get_id()}")])
                assert await relay.reach_peer(d, target) == "relayed"
                with pytest.raises(ConnectionError):  # a second circuit: over max_circuits
                    await relay.reach_peer(e, target, timeout=10)
                stream = await d.new_stream(a.get_id(), ["/sink/1"])
                sent = 0
                with pytest.raises(Exception):  # noqa: B017 (reset: whatever the muxer raises)
                    with trio.fail_after(30):
                        for _ in range(64):
                            await stream.write(b"x" * 32768)
                            sent += 32768
                            await trio.sleep(0.01)
                assert sent <= limits.max_circuit_bytes + 2 * 65536, sent
                print(f"\ncut off after {sent} bytes of a {limits.max_circuit_bytes}-byte limit")

    trio.run(main)
