"""The monitor's crawl over real libp2p hosts in this process: a bootstrap peer, peers
posing as verifiers (honest and hostile, `hostile_verifier`), and the crawler."""

from __future__ import annotations

import hostile_peer
import trio
from hostile_verifier import HTML_MODEL, pose
from libp2p.crypto.ed25519 import create_new_key_pair

from specedge.monitor import page
from specedge.monitor.crawl import GONE, NOT_VERIFIER, VERIFIER, crawl_once
from specedge.monitor.state import Swarm
from specedge.protocol import hosts

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
HOSTILE = {  # mode -> the error code the monitor must report
    "garbage": "MALFORMED", "wrong": "UNEXPECTED_MESSAGE", "invalid": "UNSUPPORTED_VERSION",
    "huge": "TOO_LARGE", "silent": "TIMEOUT", "hangup": "STREAM_CLOSED",
}


def peer_of(addrs: list[str]) -> str:
    return addrs[0].rsplit("/p2p/", 1)[1]


async def crawler(boot: list[str], crawls: int, between=None,  # noqa: ANN001, ANN201
                  also: list[str] = ()):  # noqa: B006
    """Run `crawls` crawls from the bootstrap peer (and the peers `also` names) into a
    Swarm; `between(i, swarm)` runs after crawl i. Returns the swarm and the last crawl."""
    swarm = Swarm(refresh_s=1.0)
    start = [hosts.parse_peer_addr(a) for a in [*boot, *also]]
    last = None
    async with hosts.running_host(create_new_key_pair(), [LOOPBACK]) as host:
        async with hosts.running_dht(host, server=False, bootstrap=boot) as dht:
            swarm.peer_id = host.get_id().to_base58()
            for i in range(crawls):
                last = await crawl_once(host, dht, start, swarm.models(), swarm.known())
                swarm.apply(last)
                if between is not None:
                    await between(i, swarm)
                await trio.sleep(0.2)
    return swarm, last


def test_hostile_peers_are_flagged_and_cannot_stop_the_crawl_or_break_the_page():
    async def main():
        async with trio.open_nursery() as nursery:
            boot = await nursery.start(hosts.run_bootstrap_peer, create_new_key_pair(),
                                       [LOOPBACK])
            peers, addrs = {}, {}
            for mode in ["good", "html", "kad-garbage", *HOSTILE]:
                addrs[mode] = await nursery.start(pose, mode, boot)
                peers[mode] = peer_of(addrs[mode])
            # The DHT vandal is a start peer: the bootstrap peer's table may refuse it, and
            # the walk must meet it for sure.
            swarm, last = await crawler(boot, 2, also=addrs["kad-garbage"][:1])
            nursery.cancel_scope.cancel()
        return boot, peers, swarm, last

    boot, peers, swarm, last = hostile_peer.run(main)
    doc = swarm.snapshot()
    verifiers = {v["peer_id"]: v for v in doc["verifiers"]}
    assert set(verifiers) == {peers["good"], peers["html"]}, doc
    good = verifiers[peers["good"]]
    assert good["model_id"] == "tiny-test" and good["reachability"] == "direct"
    assert good["tokens_per_s"] > 0  # 500 more tokens at each query
    assert verifiers[peers["html"]]["model_id"] == HTML_MODEL  # stored as sent
    troubles = {t["peer_id"]: t for t in doc["misbehaving"]}
    for mode, code in HOSTILE.items():
        t = troubles[peers[mode]]
        assert t["problem"].startswith(code), (mode, t)
        assert t["model_id"] == "tiny-test" and t["bad_answers"] == 2
    assert set(troubles) == {peers[m] for m in HOSTILE}
    # The bootstrap peer and the DHT vandal are plain peers: walked, asked, not shown.
    assert last.answers[peer_of(boot)].kind == NOT_VERIFIER
    assert last.answers[peers["kad-garbage"]].kind == NOT_VERIFIER
    assert doc["totals"]["verifiers"] == 2 and doc["totals"]["misbehaving"] == len(HOSTILE)
    html = page.render_page(doc)
    assert "<script>alert" not in html and peers["garbage"] in html


def test_a_dead_verifier_leaves_at_the_next_crawl():
    async def main():
        async with trio.open_nursery() as nursery:
            boot = await nursery.start(hosts.run_bootstrap_peer, create_new_key_pair(),
                                       [LOOPBACK])
            keep = peer_of(await nursery.start(pose, "good", boot, "model-a"))
            doomed_scope = trio.CancelScope()

            async def doomed_verifier(task_status=trio.TASK_STATUS_IGNORED):  # noqa: ANN001
                with doomed_scope:
                    await pose("good", boot, "model-b", task_status=task_status)

            doomed = peer_of(await nursery.start(doomed_verifier))
            first = []

            async def between(i: int, swarm: Swarm) -> None:
                if i == 0:
                    first.append(swarm.snapshot())
                    doomed_scope.cancel()  # its host stops: its connections close

            swarm, last = await crawler(boot, 2, between)
            nursery.cancel_scope.cancel()
        return keep, doomed, first[0], swarm, last

    keep, doomed, first, swarm, last = hostile_peer.run(main)
    assert {v["peer_id"] for v in first["verifiers"]} == {keep, doomed}
    assert {m["model_id"] for m in first["models"]} == {"model-a", "model-b"}
    doc = swarm.snapshot()
    assert [v["peer_id"] for v in doc["verifiers"]] == [keep]
    assert last.answers[doomed].kind == GONE and last.answers[keep].kind == VERIFIER
    assert [g["peer_id"] for g in doc["gone"]] == [doomed]
    assert doomed not in page.render_page(doc)
