"""Real hosts for network tests: Linux network namespaces joined by veth pairs, NAT routers
with iptables MASQUERADE, and round trip added by a delaying TCP forwarder.

    wan (the "internet", 10.77.0.0/16; the bootstrap/relay peer runs here)
     ├─ 10.77.1.1 ── veth ── 10.77.1.2  router ra  (MASQUERADE out of its wan side)
     │                                   10.88.1.1 ── veth ── 10.88.1.2  host a
     └─ 10.77.2.1 ── veth ── 10.77.2.2  router rb  (MASQUERADE)
                                         10.88.2.1 ── veth ── 10.88.2.2  host b

A host behind a router can dial out to wan; nothing on wan can dial in to it (the router
drops unsolicited packets and forwards none), as behind a home router. Two such NATs let
a TCP hole punch through (Linux conntrack keeps the source port and accepts the peer's
simultaneous SYN), so DCUtR can succeed between a and b. Every namespace and link is made by
the test that uses it, named with a random suffix, and deleted at the end (deleting a
namespace deletes its veth ends and ends whatever still runs in it). Needs root, iproute2
and iptables (scripts/system-deps installs them); the tests skip, saying why, only where
the kernel or the machine refuses namespaces.

`tc netem` would add latency in the kernel, but this kernel lacks it (no sch_netem), so
round trip is added by ``bench.latency``: a trio TCP forwarder that holds every byte for
rtt/2 in each direction, run inside a namespace.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def netns_refused() -> str | None:
    """Why namespaces cannot be used here (None when they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (bash scripts/system-deps installs it)"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the tests as root)"
    name = f"seprobe{secrets.token_hex(3)}"
    res = _ip("netns", "add", name, check=False)
    if res.returncode != 0:
        return f"the kernel refused a network namespace: {res.stderr.strip()}"
    try:
        nat = subprocess.run(["ip", "netns", "exec", name, "iptables", "-t", "nat", "-L"],
                             capture_output=True, text=True, timeout=30)
        if nat.returncode != 0:
            return f"the kernel refused iptables NAT: {nat.stderr.strip()[:200]}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


class Netns:
    """Namespaces and veth links made for one test; ``close`` deletes them all."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.names: dict[str, str] = {}
        self._links = 0

    def add(self, short: str) -> str:
        full = f"se{self.tag}{short}"
        _ip("netns", "add", full)
        self.names[short] = full
        self.sh(short, "ip link set lo up")
        return full

    def sh(self, ns: str, command: str) -> str:
        res = subprocess.run(["ip", "netns", "exec", self.names[ns], "sh", "-c", command],
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"[{ns}] {command}: {res.stderr.strip()}")
        return res.stdout

    def link(self, a: str, a_cidr: str, b: str, b_cidr: str) -> tuple[str, str]:
        """A veth pair between namespaces ``a`` and ``b`` with these addresses."""
        self._links += 1
        ia, ib = f"v{self.tag}{self._links}a", f"v{self.tag}{self._links}b"
        _ip("link", "add", ia, "netns", self.names[a], "type", "veth", "peer", "name", ib,
            "netns", self.names[b])
        self.sh(a, f"ip addr add {a_cidr} dev {ia} && ip link set {ia} up")
        self.sh(b, f"ip addr add {b_cidr} dev {ib} && ip link set {ib} up")
        return ia, ib

    def prefix(self, ns: str) -> list[str]:
        """The command prefix that runs a program inside namespace ``ns``."""
        return ["ip", "netns", "exec", self.names[ns]]

    def close(self) -> None:
        for full in self.names.values():
            pids = _ip("netns", "pids", full, check=False).stdout.split()
            for pid in pids:  # only processes this test started live in its namespaces
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", full, check=False)
        self.names.clear()


class NatTopology(Netns):
    """The picture in the module docstring: wan, two NAT routers, a host behind each."""

    WAN_A, WAN_B = "10.77.1.1", "10.77.2.1"  # wan's side of each router link
    ROUTER_A, ROUTER_B = "10.77.1.2", "10.77.2.2"  # the routers' public addresses
    HOST_A, HOST_B = "10.88.1.2", "10.88.2.2"

    def __init__(self) -> None:
        super().__init__()
        for ns in ("wan", "ra", "rb", "a", "b"):
            self.add(ns)
        self.sh("wan", "sysctl -qw net.ipv4.ip_forward=1")
        for r, wan_ip, pub, lan_gw, host_ip, host in (
                ("ra", self.WAN_A, self.ROUTER_A, "10.88.1.1", self.HOST_A, "a"),
                ("rb", self.WAN_B, self.ROUTER_B, "10.88.2.1", self.HOST_B, "b")):
            _, wan_if = self.link("wan", f"{wan_ip}/24", r, f"{pub}/24")
            self.link(r, f"{lan_gw}/24", host, f"{host_ip}/24")
            # Like a home router: masquerade outgoing, drop (not refuse) whatever comes
            # in unasked, so a hole-punching SYN that arrives early is retried, not reset.
            self.sh(r, f"sysctl -qw net.ipv4.ip_forward=1 && ip route add default via {wan_ip}"
                    f" && iptables -t nat -A POSTROUTING -o {wan_if} -j MASQUERADE"
                    f" && iptables -A INPUT -i {wan_if} -m conntrack --ctstate NEW -j DROP")
            self.sh(host, f"ip route add default via {lan_gw}")


def delay_forwarder(netns: Netns, ns: str, listen: str, upstream: str, rtt_ms: float,
                    port_file: Path) -> list[str]:
    """Command line of a ``bench.latency`` forwarder inside namespace ``ns``."""
    return [*netns.prefix(ns), sys.executable, "-m", "bench.latency", "--listen", listen,
            "--to", upstream, "--rtt-ms", str(rtt_ms), "--port-file", str(port_file)]


@contextmanager
def made(kind: type[Netns] = NatTopology, *names: str) -> Iterator[Netns]:
    """A topology (or, for ``Netns``, bare namespaces ``names``) deleted on exit; the
    test is skipped, saying why, where namespaces cannot be made."""
    why = netns_refused()
    if why:
        pytest.skip(why)
    topo = kind()
    try:
        for name in names:
            topo.add(name)
        yield topo
    finally:
        topo.close()


def in_ns(netns: Netns, ns: str, args: Sequence[str]) -> list[str]:
    return [*netns.prefix(ns), *[str(a) for a in args]]
