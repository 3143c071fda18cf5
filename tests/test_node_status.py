"""The live status screen and the verifier ranking, without a network."""

from __future__ import annotations

import io

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from rich.console import Console

from specedge.node.discovery import Candidate, VerifierPool
from specedge.node.edge import Edge, Models
from specedge.node.receipts import ReceiptBook
from specedge.node.status import render, summary
from specedge.protocol import specedge_pb2 as pb


def candidate(free: int, queue: int, rtt: float, verify_us: int = 1000) -> Candidate:
    pid = ID.from_pubkey(create_new_key_pair().public_key)
    advert = pb.Advertisement(model_id="tiny-test", free_slots=free, queue_depth=queue,
                              mean_verify_micros=verify_us, max_batch_tokens=64,
                              protocol_version="1.0.0")
    return Candidate(PeerInfo(pid, []), advert, rtt, "dht", 0.0)


def test_ranking_prefers_free_slots_then_short_queues_then_speed():
    full = candidate(0, 0, 0.001)
    queued = candidate(4, 3, 0.001)
    slow = candidate(4, 0, 0.050)
    fast = candidate(4, 0, 0.002)
    slow_verify = candidate(4, 0, 0.002, verify_us=90_000)
    ranked = sorted([full, queued, slow, fast, slow_verify], key=Candidate.rank_key)
    assert ranked == [fast, slow, slow_verify, queued, full]


class FakeHost:
    def get_id(self):
        return ID.from_pubkey(create_new_key_pair().public_key)


def test_status_shows_verifiers_work_and_credit(tiny_pair):
    draft, _, tok = tiny_pair
    pool = VerifierPool(FakeHost(), create_new_key_pair(), "tiny-test")
    in_use, spare = candidate(3, 0, 0.002), candidate(4, 1, 0.004)
    pool.ranked = [in_use, spare]
    pool.in_use = {in_use.peer: 1}
    pool.failed("12D3KooWdeadbeef", "STREAM_CLOSED: killed")
    edge = Edge(Models(draft, tok, [258], "tiny-test", "tiny-test-draft"), pool)
    a = edge.activity
    a.tokens, a.drafted, a.accepted, a.rounds, a.completed = 120, 80, 60, 20, 3
    a.proactive_hits, a.proactive_bets = 9, 20
    book = ReceiptBook(None, "node", None)
    book.tally.receipts, book.tally.stored, book.tally.credit = 20, 20, 60
    console = Console(file=io.StringIO(), width=140, record=True)
    console.print(render(edge, pool, book, node="12D3KooWnode", api="http://127.0.0.1:8000"))
    text = console.export_text()
    for want in ("in use (1)", "spare", "dead", "75.0% of 80 drafted", "9/20",
                 "60 accepted draft tokens", "http://127.0.0.1:8000/v1", "tiny-test-draft"):
        assert want in text, want
    line = summary(edge, pool, book)
    assert "credit 60" in line and "acceptance 75%" in line
