"""The dial-back check on loopback (the namespace tests cover a real NAT): a reachable
host is told so from the bootstrap peer's second host, a closed port is reported closed,
and the server dials only the requester's own IP."""

from __future__ import annotations

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.autonat.pb.autonat_pb2 import Message
from multiaddr import Multiaddr
from netutil import free_port

from specedge.protocol import hosts, relay
from specedge.verifier.reach import Reach, ReachConfig

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def test_dialback_targets_use_the_observed_ip_and_only_tcp_ports() -> None:
    req = Message(type=Message.DIAL)
    for text in ("/ip4/10.0.0.5/tcp/4001", "/ip4/192.168.1.9/tcp/4001",
                 "/ip4/10.0.0.5/tcp/4002", "/ip4/10.0.0.5/udp/9",
                 "/ip4/1.2.3.4/tcp/4000/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
                 "/p2p-circuit"):
        req.dial.peer.addrs.append(Multiaddr(text).to_bytes())
    req.dial.peer.addrs.append(b"\xff garbage")
    targets = relay.dialback_targets(req, "203.0.113.7")
    assert [str(t) for t in targets] == ["/ip4/203.0.113.7/tcp/4001", "/ip4/203.0.113.7/tcp/4002"]


def test_dialback_tells_open_from_closed_and_reach_reports_direct() -> None:
    async def main() -> None:
        with trio.fail_after(60):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                boot = await nursery.start(lambda task_status: hosts.run_bootstrap_peer(
                    create_new_key_pair(), LOOPBACK, stop=stop, task_status=task_status))
                binfo = hosts.parse_peer_addr(boot[0])
                async with hosts.running_host(create_new_key_pair(), LOOPBACK) as h:
                    await hosts.connect(h, binfo)
                    ok, _ = await relay.ask_dialback(h, binfo.peer_id, [free_port()])
                    assert ok is False  # nothing listens there: not reachable
                    reach = Reach(ReachConfig(), boot)
                    async with reach.running(h):
                        assert reach.state == "direct" and reach.dht_server, reach.summary()
                        assert reach.summary().startswith("reachable directly (")
                        assert reach.advice() == "" and reach.status()["relays"] == []
                stop.set()

    trio.run(main)
