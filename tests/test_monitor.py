"""The monitor without a network: swarm state from crawls, the page, the ledger's
leaderboard, and the web app's answers."""

from __future__ import annotations

import hashlib
import json
import re
import sys

import pytest
from hostile_verifier import HTML_MODEL, HTML_REVISION, advertisement
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from starlette.testclient import TestClient

from specedge.ledger import open_ledger
from specedge.ledger.testing import make_pair, make_peers
from specedge.monitor import leaderboard, page
from specedge.monitor.crawl import (
    GONE,
    MISBEHAVING,
    NOT_VERIFIER,
    VERIFIER,
    Answer,
    Crawl,
    bucket_key,
    closer_peers,
    routing_key,
)
from specedge.monitor.server import make_app
from specedge.monitor.state import GONE_KEEP_S, HISTORY_S, Swarm, reachability
from specedge.protocol.errors import ProtocolError

PEER_A = "12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
PEER_B = "12D3KooWBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
ADDR = "/ip4/127.0.0.1/tcp/4001"
RELAYED = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWRelay/p2p-circuit"


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def good(peer: str, model: str = "tiny-test", addrs: list[str] | None = None,
         **figures: int) -> Answer:
    return Answer(peer, addrs or [ADDR], VERIFIER, advertisement(model, **figures), 0.004)


def crawl(*answers: Answer, claims: dict[str, set[str]] | None = None) -> Crawl:
    return Crawl(started=0.0, seconds=0.5, walked=len(answers),
                 answers={a.peer_id: a for a in answers}, claims=claims or {})


def swarm() -> tuple[Swarm, Clock]:
    clock = Clock()
    return Swarm(refresh_s=5.0, peer_id="12D3KooWMonitor", clock=clock), clock


# ---------------------------------------------------------------------------- state


def test_reachability_comes_from_the_announced_addresses():
    assert reachability([ADDR]) == "direct"
    assert reachability([ADDR, RELAYED]) == "relayed"  # it reserved a relay slot
    assert reachability([]) == "unknown"


def test_a_verifier_shows_its_figures_uptime_and_a_rate_from_its_counter():
    s, clock = swarm()
    s.apply(crawl(good(PEER_A, committed_tokens=1000, sessions_open=3)))
    clock.t += 10
    s.apply(crawl(good(PEER_A, committed_tokens=1500, sessions_open=4)))
    doc = s.snapshot()
    (v,) = doc["verifiers"]
    assert v["model_id"] == "tiny-test" and v["reachability"] == "direct"
    assert (v["free_slots"], v["queue_depth"], v["verify_ms"]) == (7, 2, 12.5)
    assert v["sessions"] == 4 and v["tokens_per_s"] == pytest.approx(50.0)
    assert v["uptime_s"] == pytest.approx(10.0) and v["audit"] == "unknown"
    assert doc["totals"] == {"verifiers": 1, "models": 1, "sessions": 4, "free_slots": 7,
                             "queue_depth": 2, "tokens_per_s": pytest.approx(50.0),
                             "misbehaving": 0, "peers": 1}
    assert [h["tokens_per_s"] for h in doc["history"]] == [None, pytest.approx(50.0)]
    json.dumps(doc, allow_nan=False)  # the API document is plain JSON


def test_a_counter_that_goes_back_is_a_restart_uptime_starts_again():
    s, clock = swarm()
    s.apply(crawl(good(PEER_A, committed_tokens=5000)))
    clock.t += 60
    s.apply(crawl(good(PEER_A, committed_tokens=10)))
    (v,) = s.snapshot()["verifiers"]
    assert v["uptime_s"] == 0.0 and v["tokens_per_s"] is None


def test_a_dead_verifier_leaves_the_list_at_once_and_is_kept_an_hour_as_gone():
    s, clock = swarm()
    s.apply(crawl(good(PEER_A), good(PEER_B)))
    clock.t += 5
    s.apply(crawl(good(PEER_A), Answer(PEER_B, [ADDR], GONE, problem="connection refused")))
    doc = s.snapshot()
    assert [v["peer_id"] for v in doc["verifiers"]] == [PEER_A]
    assert doc["gone"] == [{"peer_id": PEER_B, "model_id": "tiny-test",
                            "last_seen_unix": clock.t - 5, "why": "connection refused"}]
    assert PEER_B not in page.render_page(doc)
    clock.t += GONE_KEEP_S + 10
    s.apply(crawl(good(PEER_A)))
    assert s.snapshot()["gone"] == []


def test_a_misbehaving_verifier_is_shown_as_such_and_recovers_with_its_record():
    s, clock = swarm()
    s.apply(crawl(good(PEER_A)))
    clock.t += 5
    bad = Answer(PEER_A, [ADDR], MISBEHAVING, problem="MALFORMED: not a frame")
    s.apply(crawl(bad))
    doc = s.snapshot()
    assert doc["verifiers"] == [] and doc["totals"]["misbehaving"] == 1
    (t,) = doc["misbehaving"]
    assert (t["model_id"], t["problem"], t["bad_answers"]) == (
        "tiny-test", "MALFORMED: not a frame", 1)
    clock.t += 5
    s.apply(crawl(bad, claims={PEER_A: {"claimed-model"}}))  # the latest claim is shown
    assert s.snapshot()["misbehaving"][0]["bad_answers"] == 2
    assert s.snapshot()["misbehaving"][0]["model_id"] == "claimed-model"
    clock.t += 5
    s.apply(crawl(good(PEER_A)))
    doc = s.snapshot()
    assert doc["misbehaving"] == [] and doc["verifiers"][0]["bad_answers"] == 2


def test_a_provider_without_the_advert_protocol_misbehaves_a_plain_peer_does_not():
    s, _ = swarm()
    s.apply(crawl(Answer(PEER_A, [ADDR], NOT_VERIFIER, problem="no advert protocol"),
                  Answer(PEER_B, [ADDR], NOT_VERIFIER, problem="no advert protocol"),
                  claims={PEER_A: {"big-model"}}))
    doc = s.snapshot()
    assert [(t["peer_id"], t["model_id"]) for t in doc["misbehaving"]] == [
        (PEER_A, "big-model")]
    assert doc["totals"]["peers"] == 2
    assert s.models() == {"big-model"}  # its providers are looked up next time
    assert {p.peer_id.to_base58() for p in s.known()} == {PEER_A}


def test_history_keeps_two_hours():
    s, clock = swarm()
    for _ in range(5):
        s.apply(crawl(good(PEER_A)))
        clock.t += HISTORY_S / 2
    assert len(s.snapshot()["history"]) == 3


def test_models_are_grouped_with_their_load():
    s, clock = swarm()
    s.apply(crawl(good(PEER_A, "m1", sessions_open=2), good(PEER_B, "m1", sessions_open=5),
                  good("12D3KooWCccc", "m2", free_slots=0)))
    rows = s.snapshot()["models"]
    assert [(r["model_id"], r["verifiers"], r["sessions"]) for r in rows] == [
        ("m1", 2, 7), ("m2", 1, 3)]


def test_a_find_node_answer_is_parsed_defensively():

    good_addr = Multiaddr("/ip4/10.0.0.1/tcp/4001").to_bytes()
    peers = [Message.Peer(id=b"\x00\x24" + bytes(36), addrs=[good_addr, b"\xff\x00junk", b""]),
             Message.Peer(id=b"x" * 500, addrs=[good_addr]),  # no peer id is that long
             *[Message.Peer(id=bytes([i]) * 34) for i in range(100)]]
    data = Message(type=Message.MessageType.FIND_NODE, closerPeers=peers).SerializeToString()
    found = closer_peers(data)
    assert len(found) == 39  # the first 40 entries, the oversized id dropped
    assert [str(a) for a in found[0].addrs] == ["/ip4/10.0.0.1/tcp/4001"]  # junk dropped
    with pytest.raises(ProtocolError, match="MALFORMED"):
        closer_peers(b"\xff" * 20)
    point = routing_key(ID(b"\x00\x24" + bytes(36)))
    for cpl in (0, 3, 9):
        key = bucket_key(point, cpl)
        got = int.from_bytes(hashlib.sha256(key).digest(), "big")
        want = int.from_bytes(point, "big")
        assert (got ^ want).bit_length() == 256 - cpl  # exactly cpl leading bits shared


# ---------------------------------------------------------------------------- page


def test_everything_a_peer_sends_is_escaped():
    s, _ = swarm()
    ad = good(PEER_A, HTML_MODEL, addrs=[ADDR])
    ad.advert.revision = HTML_REVISION
    s.apply(crawl(ad, Answer(PEER_B, [ADDR], MISBEHAVING, problem="<b>bad</b>" + HTML_MODEL),
                  claims={PEER_B: {"<i>model</i>"}}))
    html = page.render_page(s.snapshot())
    assert "<script>alert" not in html and "<img" not in html
    assert "<b>bad</b>" not in html and "<i>model</i>" not in html
    assert page.esc(HTML_MODEL)[:40] in html  # shown, as text
    # The only tags are the page's own.
    tags = set(re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)", html))
    assert tags <= {"html", "head", "meta", "title", "link", "noscript", "script", "body",
                    "header", "h1", "h2", "h3", "span", "main", "p", "section", "div", "table",
                    "thead", "tbody", "tr", "th", "td", "footer", "a", "strong", "code",
                    "svg", "line", "polygon", "polyline"}, tags
    assert html.count("<script") == 1  # the monitor's own script file, nothing inline


def test_the_page_loads_nothing_from_outside_and_fits_a_phone():
    s, _ = swarm()
    s.apply(crawl(good(PEER_A)))
    html = page.render_page(s.snapshot())
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert 'name="viewport"' in html and 'class="scroll"' in html
    css = (page.__file__.rsplit("/", 1)[0] + "/monitor.css")
    assert "@media (max-width" in open(css).read()
    assert "http" not in open(css).read()


def test_the_page_shows_the_verifier_row_totals_and_an_empty_network_plainly():
    s, clock = swarm()
    assert "first crawl is running" in page.render_page(s.snapshot())
    for count in (100, 200, 500):
        s.apply(crawl(good(PEER_A, committed_tokens=count)))
        clock.t += 10
    html = page.render_page(s.snapshot())
    row = re.search(r'<tr class="verifier" data-peer="([^"]+)">(.*?)</tr>', html).groups()
    assert row[0] == PEER_A and "tiny-test" in row[1] and "direct" in row[1]
    assert 'id="total-verifiers"><span class="value">1<' in html
    assert 'id="total-tokens"><span class="value">30.0<' in html
    assert "<svg" in html  # two rates: a throughput plot


def test_svg_plot_scales_into_its_box():
    svg = page.svg_plot([(0, 0.0), (30, 5.0), (60, 10.0)], title="t", unit="tok/s")
    line = re.search(r'<polyline class="line" points="([^"]+)"', svg).group(1)
    points = [tuple(float(c) for c in p.split(",")) for p in line.split()]
    assert points[0] == (0.0, 100.0) and points[-1][0] == 600.0  # 0 at the bottom, now right
    assert 0 < points[-1][1] < 100  # the peak stays inside the box (10% headroom)
    assert "11.0 tok/s" in svg and "60 s ago" in svg
    assert "not enough data" in page.svg_plot([(0, 1.0)], title="t", unit="u")


# ---------------------------------------------------------------------------- ledger


@pytest.fixture
def ledger_url(tmp_path):
    url = str(tmp_path / "ledger.sqlite3")
    verifiers = make_peers(tmp_path, 2, "v")
    nodes = make_peers(tmp_path, 3, "n")
    now_ms = 1_800_000_000_000
    with open_ledger(url) as ledger:
        for i, (node, accepted) in enumerate([(nodes[0], 6), (nodes[1], 2), (nodes[0], 5)]):
            sid = bytes([i]) * 16
            for seq in range(1, 11):
                ledger.ingest(*make_pair(verifiers[i % 2], node, sid, seq, drafted=8,
                                         accepted=accepted, unix_ms=now_ms - 120_000 + seq))
        ledger.record_baseline("server_only", tokens=1000, server_seconds=2.0)
    return url, verifiers, nodes, now_ms


def test_the_leaderboard_ranks_nodes_and_verifiers_and_compares_cost(ledger_url):
    url, verifiers, nodes, now_ms = ledger_url
    with leaderboard.open_readonly(url) as ledger:
        doc = leaderboard.read_board(ledger, now_ms)
    assert [n["peer_id"] for n in doc["nodes"]] == [nodes[0].peer_id, nodes[1].peer_id]
    assert doc["nodes"][0]["accepted"] == 110 and doc["nodes"][0]["credit"] == 110
    assert [v["peer_id"] for v in doc["verifiers"]] == [verifiers[0].peer_id,
                                                        verifiers[1].peer_id]
    assert doc["verifiers"][0]["tokens_verified"] == 160
    cost = doc["cost"]
    assert cost["tokens"] == 30 + 110 + 20  # accepted + one bonus per round
    assert cost["efficiency_vs_server_only"] == pytest.approx(
        cost["server_only_usd_per_mtok"] / cost["usd_per_mtok"])
    points = doc["throughput"]
    assert len(points) == 61 and sum(p["tokens_per_s"] for p in points) * 60 == pytest.approx(160)
    json.dumps(doc, allow_nan=False)
    s, _ = swarm()
    s.ledger = doc
    html = page.render_page(s.snapshot())
    assert nodes[0].peer_id in html and "the cost efficiency" in html


def test_a_missing_ledger_file_is_an_error_not_a_new_ledger(tmp_path):
    with pytest.raises(ValueError, match="no ledger file"):
        leaderboard.open_readonly(str(tmp_path / "nope.sqlite3"))
    assert not (tmp_path / "nope.sqlite3").exists()


def test_served_over_time_buckets_receipts(tmp_path):
    v, n = make_peers(tmp_path, 2)
    with open_ledger(str(tmp_path / "l.sqlite3")) as ledger:
        for seq, ms in enumerate([1_000, 59_000, 60_000, 200_000], start=1):
            ledger.ingest(*make_pair(v, n, b"\x07" * 16, seq, accepted=3, unix_ms=ms))
        assert ledger.served_over_time(0, 60_000) == [(0, 8), (60_000, 4), (180_000, 4)]
        assert ledger.served_over_time(60_000, 60_000) == [(60_000, 4), (180_000, 4)]


# ---------------------------------------------------------------------------- web app


def test_the_app_serves_page_fragment_api_and_assets_with_a_strict_policy():
    s, _ = swarm()
    s.apply(crawl(good(PEER_A)))
    client = TestClient(make_app(s))
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert PEER_A in r.text
    frag = client.get("/fragment")
    assert frag.status_code == 200 and "<html" not in frag.text and PEER_A in frag.text
    api = client.get("/api/state")
    assert api.json()["verifiers"][0]["peer_id"] == PEER_A
    assert api.headers["access-control-allow-origin"] == "*"
    for name in ("monitor.css", "monitor.js", "favicon.svg"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/..%2Fcli.py").status_code == 404
    assert client.get("/static/other.js").status_code == 404


def test_the_monitor_never_imports_node_verifier_or_torch():
    import subprocess

    code = ("import sys; import specedge.monitor.server, specedge.monitor.cli; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(("
            "'specedge.node', 'specedge.verifier', 'transformers'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
