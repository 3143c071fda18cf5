"""Credit that buys service: standing from signed receipts, ranking under load with
aging, reserved slots, and portable statements that cannot be forged."""

from __future__ import annotations

import json
import random
import time

import pytest
import trio
from faultutil import Verifier
from libp2p.crypto.ed25519 import create_new_key_pair
from netutil import TESTS, Proc, python_script
from test_verifier_scheduler import RecordingEngine, bounded, session

from specedge.ledger import open_ledger
from specedge.ledger.testing import Peer, make_pair
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import open_statement, seal_statement
from specedge.protocol.errors import ErrorCode, ProtocolError
from specedge.protocol.identity import peer_id_of
from specedge.protocol.validation import validate_statement
from specedge.verifier.scheduler import Scheduler
from specedge.verifier.sessions import SessionTable
from specedge.verifier.standing import GRANT, HALF_LIFE_S, Standings, boost, decayed

DAY_MS = 86_400_000


def test_standing_decays_by_half_each_half_life():
    now = 10 * DAY_MS
    week = int(HALF_LIFE_S * 1000)
    assert decayed([(now, 100.0)], now) == 100.0
    assert decayed([(now - week, 100.0)], now) == pytest.approx(50.0)
    assert decayed([(now - 2 * week, 80.0), (now, 10.0)], now) == pytest.approx(30.0)
    assert boost(GRANT, 1.0) == 0 and boost(GRANT / 10, 1.0) == 0  # never below fresh
    assert boost(8 * GRANT, 0.5) == pytest.approx(1.5)  # three doublings


def seeded_ledger(tmp_path, verifier: Peer, node: Peer, receipts: int, accepted: int = 50):
    url = f"sqlite:///{tmp_path / 'seeded.sqlite3'}"
    rng = random.Random(1)
    with open_ledger(url) as led:
        for _ in range(receipts):
            led.ingest(*make_pair(verifier, node, rng.randbytes(16), 1, drafted=accepted + 4,
                                  accepted=accepted, rng=rng))
    return url


def test_standing_comes_from_signed_receipts_and_starts_at_the_grant(tmp_path):
    verifier, node = Peer(tmp_path / "v.key"), Peer(tmp_path / "n.key")
    url = seeded_ledger(tmp_path, verifier, node, receipts=10)
    with open_ledger(url) as led:
        standings = Standings(led)
        fresh = peer_id_of(create_new_key_pair())
        assert standings.earned(node.peer_id) == GRANT  # not looked up yet
        assert standings.earned(verifier.peer_id) == GRANT
        standings.refresh()  # the peers asked about, off the event loop in the verifier
        # (receipts are bucketed by the hour: up to an hour's decay, 0.4%)
        assert standings.earned(node.peer_id) == pytest.approx(GRANT + 500, rel=1e-2)
        assert standings.earned(verifier.peer_id) == pytest.approx(GRANT + 540, rel=1e-2)
        standings.refresh({fresh})
        assert standings.earned(fresh) == GRANT  # a new identity: the grant, nothing more


def test_the_last_slots_are_kept_for_earned_standing():
    table = SessionTable(max_sessions=4, max_per_peer=4, reserved=1)
    for peer in ("a", "b", "c"):
        table.reserve(peer, earned=False)
    with pytest.raises(ProtocolError) as err:
        table.reserve("sybil", earned=False)
    assert err.value.code == ErrorCode.BUSY and "earned standing" in err.value.message
    table.reserve("veteran", earned=True)
    assert table.free_slots == 0


def test_earned_standing_goes_first_and_waiting_still_wins():
    """A pass with room for one request takes the earned node's before a fresh one that
    came a little earlier; a fresh request that has waited longer than the earned one's
    head start (1000x the grant: about 10 boost units) goes before both."""
    from specedge.models import build_tiny

    engine = RecordingEngine(build_tiny()[0], prefill_chunk=8)
    rich = 1000 * GRANT
    order: list[str] = []

    async def main() -> None:
        sched = Scheduler(engine, max_batch_tokens=8, boost_passes=1.0,
                          standing=lambda s: rich if s.peer == "rich" else GRANT)
        sched.mean_pass_seconds = 0.1  # a boost unit: ~1 s of head start at 1000x
        sessions = {name: session(engine, [1, 2, 3]) for name in ("old", "rich", "new")}
        for name, s in sessions.items():
            s.peer = name
            while (job := engine.next_prefill(s.state)) is not None:
                engine.run([job])

        async def ask(name: str, delay: float) -> None:
            await trio.sleep(delay)
            await sched.verify(sessions[name], [5, 6, 7, 8], [-1, 0, 1, 2])
            order.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "old", 0.0)    # fresh, waits 2 s before passes start
            nursery.start_soon(ask, "new", 1.8)    # fresh, waits 0.2 s
            nursery.start_soon(ask, "rich", 1.9)   # waits 0.1 s, plus ~1 s of head start
            await trio.sleep(2.0)
            await nursery.start(sched.run)  # one 5-row request per pass from here on
            with trio.fail_after(30):
                while len(order) < 3:
                    await trio.sleep(0.01)
            sched.close()

    trio.run(bounded, main)
    assert order == ["old", "rich", "new"]


def test_statements_count_only_when_signed_by_an_accepted_issuer_for_this_node():
    issuer, other, node = create_new_key_pair(), create_new_key_pair(), create_new_key_pair()
    now = int(time.time() * 1000)

    def statement(signer=issuer, **kw) -> bytes:
        st = pb.StandingStatement(issuer_peer_id=peer_id_of(signer),
                                  node_peer_id=peer_id_of(node), earned=5000.0,
                                  as_of_unix_ms=now, half_life_s=HALF_LIFE_S)
        for k, v in kw.items():
            setattr(st, k, v)
        return seal_statement(signer, st)

    def check(data: bytes) -> None:
        _, st = open_statement(data)
        validate_statement(st, node=peer_id_of(node), issuers=[peer_id_of(issuer)],
                           now_ms=now, max_age_s=7 * 86400)

    check(statement())  # the good one
    forged = bytearray(statement())
    forged[-1] ^= 1
    cases = {
        "forged signature": (bytes(forged), ErrorCode.BAD_SIGNATURE),
        "about another node": (statement(node_peer_id=peer_id_of(other)), ErrorCode.WRONG_PEER),
        "untrusted issuer": (statement(signer=other), ErrorCode.WRONG_PEER),
        "issuer it did not sign": (seal_statement(other, pb.StandingStatement(
            issuer_peer_id=peer_id_of(issuer), node_peer_id=peer_id_of(node), earned=1e6,
            as_of_unix_ms=now)), ErrorCode.WRONG_PEER),
        "stale": (statement(as_of_unix_ms=now - 8 * DAY_MS), ErrorCode.INVALID_PARAMETER),
        "from the future": (statement(as_of_unix_ms=now + DAY_MS), ErrorCode.INVALID_PARAMETER),
        "absurd": (statement(earned=float("inf")), ErrorCode.INVALID_PARAMETER),
    }
    for name, (data, code) in cases.items():
        with pytest.raises(ProtocolError) as err:
            check(data)
        assert err.value.code == code, name


# ---------------------------------------------------------------------------- under load


def run_classes(tmp_path, per_class: int, duration: float, extra: tuple = ()) -> dict:
    """One verifier at about twice its capacity (passes of 40 rows; 2 x per_class
    sessions of 5-row chains), a high-standing node and a fresh identity with
    `per_class` sessions each. Returns each class's per-session rates and the
    verifier's queue wait and inter-token latency by standing class."""
    from test_load import _truths

    vkey, hkey = tmp_path / "v.key", tmp_path / "high.key"
    url = seeded_ledger(tmp_path, Peer(vkey), Peer(hkey), receipts=220)  # ~11,000 tokens
    truth_file = tmp_path / "truths.json"
    _truths(truth_file, 120)
    v = Verifier(tmp_path, "v", "--no-dht", "--max-batch-tokens", "40", "--prefill-chunk",
                 "32", "--test-pass-delay", "0.03", "--max-sessions-per-peer", "32",
                 *extra, ledger=url, identity=vkey).ready()
    start = tmp_path / "start"
    clients = {name: Proc(python_script(TESTS / "load_client.py", "--addr", v.addr,
                                        "--truth-file", truth_file, "--sessions", per_class,
                                        "--offset", i * per_class, "--duration", duration,
                                        "--start-file", start, "--miss", 0.2, "--segment", 100,
                                        *(["--identity", hkey] if name == "high" else [])),
                          tmp_path, name)
               for i, name in enumerate(("high", "fresh"))}
    try:
        for c in clients.values():
            c.wait_for_output("OPEN", 120)
        start.write_text(str(time.time() + 0.5))
        out = {}
        for name, c in clients.items():
            assert c.wait(120) == 0, c.describe()
            out[name] = json.loads(c.stdout().strip().splitlines()[-1])
        m = v.metrics()
    finally:
        for c in clients.values():
            c.kill()
        v.kill()
    figures = {}
    for name, res in out.items():
        assert not res["errors"] and not res["wrong"], res
        rates = sorted(s["tokens"] / s["seconds"] for s in res["sessions"])
        label = "high" if name == "high" else "fresh"
        waits = m.get(f'specedge_queue_wait_seconds_sum{{standing="{label}"}}', 0.0)
        count = m.get(f'specedge_queue_wait_seconds_count{{standing="{label}"}}', 0.0)
        itl = m.get(f'specedge_inter_token_seconds_sum{{standing="{label}"}}', 0.0)
        itl_n = m.get(f'specedge_inter_token_seconds_count{{standing="{label}"}}', 0.0)
        figures[name] = {"tokens_per_s": rates, "min_tokens": min(s["tokens"] for s in
                                                                  res["sessions"]),
                         "queue_wait_ms": 1000 * waits / max(count, 1),
                         "itl_ms": 1000 * itl / max(itl_n, 1)}
    figures["passes"] = m.get("specedge_pass_seconds_count", 0.0)
    figures["tokens"] = m.get("specedge_committed_tokens_total", 0.0)
    print(json.dumps(figures))
    return figures


def test_under_load_earned_standing_waits_less_and_nobody_starves(tmp_path):
    f = run_classes(tmp_path, per_class=8, duration=8.0)
    high, fresh = f["high"], f["fresh"]
    assert high["queue_wait_ms"] < fresh["queue_wait_ms"]
    assert high["itl_ms"] < fresh["itl_ms"]
    mid = len(high["tokens_per_s"]) // 2
    assert high["tokens_per_s"][mid] > fresh["tokens_per_s"][mid]
    assert fresh["min_tokens"] > 0  # every fresh session made progress (and was exact)


def test_a_statement_earned_on_one_verifier_counts_on_another_that_accepts_it(tmp_path):
    """Node N has earned standing on verifier A (receipts in A's ledger). Asking A for its
    advertisement gets N a statement signed by A; B, which accepts A's statements and
    says so, counts it when N opens a session there. B refuses a tampered statement."""
    from specedge.models import build_tiny
    from specedge.node.client import SessionRequest
    from specedge.node.discovery import network
    from specedge.protocol.identity import load_or_create_identity
    from specedge.sampling import SamplingParams
    from specedge.verifier.engine import TargetEngine
    from specedge.verifier.host import Verifier as VerifierHost
    from specedge.verifier.host import VerifierConfig

    a_key, n_key = tmp_path / "a.key", tmp_path / "n.key"
    url = seeded_ledger(tmp_path, Peer(a_key), Peer(n_key), receipts=20)
    target = build_tiny()[0]

    def make(key, ledger, accept=()):
        config = VerifierConfig(model_id="tiny-test", vocab_size=259, max_context_tokens=4096,
                                listen=["/ip4/127.0.0.1/tcp/0"], dht=False,
                                max_batch_tokens=128, max_tree_tokens=16,
                                accept_standing_from=list(accept))
        return VerifierHost(TargetEngine(target, prefill_chunk=32), key, config, ledger)

    a_pair = load_or_create_identity(a_key)
    ledger_a = open_ledger(url)
    va = make(a_pair, ledger_a)
    vb = make(create_new_key_pair(), None, accept=[peer_id_of(a_pair)])
    node = load_or_create_identity(n_key)
    seen = {}

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            addr_a = (await nursery.start(va.serve, stop))[0]
            addr_b = (await nursery.start(vb.serve, stop))[0]
            with trio.fail_after(60):
                async with network(node, "tiny-test", verifiers=[addr_a, addr_b]) as pool:
                    await pool.refresh()
                    await trio.sleep(1.5)  # A's standing refresher reads its ledger
                    await pool.refresh()
                    seen["statements"] = dict(pool.statements)
                    request = SessionRequest("tiny-test", [1, 2, 3], SamplingParams(), 4)
                    session = await pool.open_session(request, avoid={va.peer_id})
                    seen["b_standing"] = vb.standings.earned(peer_id_of(node))
                    await session.close()
            stop.set()

    trio.run(main)
    ledger_a.close()
    # Every verifier signs one when asked; A's says what N earned there, B's nothing.
    assert seen["statements"][va.peer_id][1] == pytest.approx(1000, rel=0.02)
    assert seen["statements"][vb.peer_id][1] == 0
    assert seen["b_standing"] == pytest.approx(GRANT + 1000, rel=0.02)
    tampered = bytearray(seen["statements"][va.peer_id][0])
    tampered[-1] ^= 1
    with pytest.raises(ProtocolError) as err:
        vb._take_statement(peer_id_of(node), bytes(tampered))
    assert err.value.code == ErrorCode.BAD_SIGNATURE
    with pytest.raises(ProtocolError):  # A's statement presented by someone else
        vb._take_statement(peer_id_of(create_new_key_pair()), seen["statements"][va.peer_id][0])
