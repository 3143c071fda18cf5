"""Ledger: ingest checks, idempotency, double entry, cost, CLI, migrations.

Every test runs on SQLite and on PostgreSQL (marked `postgres`, skipped when the server
does not answer; each test gets its own schema). Receipts are real: identities from
identity files, envelopes sealed with the protocol package.
"""

from __future__ import annotations

import json
import os
import random
import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specedge.ledger import (
    DUPLICATE,
    NETWORK_ACCOUNT,
    STORED,
    ReceiptRejected,
    open_ledger,
)
from specedge.ledger import cli as ledger_cli
from specedge.ledger.db import current_revision
from specedge.ledger.schema import Base
from specedge.ledger.testing import make_pair, make_peers, pg_available, pg_schema
from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import seal_receipt

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("identities")
    return {"v": make_peers(d, 2, "verifier"), "n": make_peers(d, 3, "node")}


@pytest.fixture(params=BACKENDS)
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "ledger.sqlite3")
        return
    if not pg_available():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is not reachable")
    with pg_schema() as url:
        yield url


@pytest.fixture
def ledger(ledger_url):
    with open_ledger(ledger_url) as led:
        yield led


def sid(rng=random) -> bytes:
    return rng.randbytes(16)


# ---------------------------------------------------------------- ingest


def test_ingest_stores_chain_and_credit(ledger, keys):
    v, n = keys["v"][0], keys["n"][0]
    s = sid()
    res = [ledger.ingest(*make_pair(v, n, s, seq, drafted=8, accepted=seq)) for seq in (1, 2, 3)]
    assert [r.status for r in res] == [STORED] * 3
    assert [r.chain_index for r in res] == [0, 1, 2]
    assert res[0].verifier == v.peer_id and res[0].node == n.peer_id
    assert ledger.balance(n.peer_id).balance == 1 + 2 + 3
    assert ledger.balance(v.peer_id).balance == 24
    assert ledger.balance(NETWORK_ACCOUNT).balance == -30
    assert sum(b.balance for b in ledger.balances()) == 0
    (head,) = ledger.heads()
    assert head.length == 3 and head.head_hash == res[-1].row_hash.hex()
    assert ledger.verify().ok


def test_idempotent_on_verifier_session_seq(ledger, keys):
    v, n = keys["v"][0], keys["n"][0]
    pair = make_pair(v, n, sid(), 1, drafted=4, accepted=2)
    first = ledger.ingest(*pair)
    again = ledger.ingest(*pair)
    many = ledger.ingest_many([pair, pair])
    assert first.status == STORED
    assert again.status == DUPLICATE and again.chain_index == first.chain_index
    assert [r.status for r in many] == [DUPLICATE, DUPLICATE]
    assert ledger.count_receipts() == 1
    assert ledger.balance(n.peer_id).balance == 2
    assert ledger.verify().ok


def test_duplicates_inside_one_batch_count_once(ledger, keys):
    v, n = keys["v"][1], keys["n"][1]
    s = sid()
    pairs = [make_pair(v, n, s, q) for q in (1, 2)]
    res = ledger.ingest_many([pairs[0], pairs[1], pairs[0]])
    assert [r.status for r in res] == [STORED, STORED, DUPLICATE]
    assert ledger.count_receipts() == 2


def test_same_session_id_on_two_verifiers_is_two_sessions(ledger, keys):
    s = sid()
    a = ledger.ingest(*make_pair(keys["v"][0], keys["n"][0], s, 1))
    b = ledger.ingest(*make_pair(keys["v"][1], keys["n"][0], s, 1))
    assert a.status == b.status == STORED
    assert ledger.count_receipts() == 2


def _forge_request_signer(keys):
    """A receipt naming node 0 for a request that node 1 signed."""
    v, n0, n1 = keys["v"][0], keys["n"][0], keys["n"][1]
    s = sid()
    _, req = make_pair(v, n1, s, 1)
    from specedge.protocol.envelopes import request_digest

    r = pb.Receipt(
        verifier_peer_id=v.peer_id,
        node_peer_id=n0.peer_id,
        session_id=s,
        seq=1,
        request_sha256=request_digest(req),
        drafted=8,
        accepted=1,
        verify_micros=1,
        unix_ms=1,
        model_id="tiny-test",
        draft_micros=30_000,
    )
    return seal_receipt(v.key_pair, r), req


def _flip_last_byte(b: bytes) -> bytes:
    return b[:-1] + bytes([b[-1] ^ 1])


BAD_PAIRS = {
    "bad_signature": lambda k: (
        _flip_last_byte(make_pair(k["v"][0], k["n"][0], sid(), 1)[0]),
        make_pair(k["v"][0], k["n"][0], sid(), 1)[1],
    ),
    "wrong_peer": _forge_request_signer,
    "digest_mismatch": lambda k: (
        make_pair(k["v"][0], k["n"][0], b"s" * 16, 1)[0],
        make_pair(k["v"][0], k["n"][0], b"s" * 16, 1)[1],  # another request, same slot
    ),
    "seq_mismatch": lambda k: make_pair(
        k["v"][0], k["n"][0], sid(), 1, receipt_overrides={"seq": 2}
    ),
    "session_mismatch": lambda k: make_pair(
        k["v"][0], k["n"][0], sid(), 1, receipt_overrides={"session_id": b"x" * 16}
    ),
    "count_mismatch": lambda k: make_pair(
        k["v"][0], k["n"][0], sid(), 1, drafted=4, receipt_overrides={"drafted": 5}
    ),
    "accepted_over_drafted": lambda k: make_pair(
        k["v"][0], k["n"][0], sid(), 1, drafted=4, receipt_overrides={"accepted": 5}
    ),
    "draft_time_mismatch": lambda k: make_pair(
        k["v"][0], k["n"][0], sid(), 1, receipt_overrides={"draft_micros": 1}
    ),
    "self_receipt": lambda k: make_pair(k["v"][0], k["v"][0], sid(), 1),
    "swapped": lambda k: tuple(reversed(make_pair(k["v"][0], k["n"][0], sid(), 1))),
    "garbage": lambda k: (b"\x00garbage", b"more garbage"),
}
EXPECTED_CODE = {
    "accepted_over_drafted": "count_mismatch",
    "swapped": "wrong_payload_type",
    "garbage": "malformed",
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_bad_pairs_are_rejected_and_change_nothing(ledger, keys, case):
    pair = BAD_PAIRS[case](keys)
    with pytest.raises(ReceiptRejected) as info:
        ledger.ingest(*pair)
    assert info.value.code == EXPECTED_CODE.get(case, case)
    (res,) = ledger.ingest_many([pair])
    assert res.status == "rejected" and res.error.code == info.value.code
    assert ledger.count_receipts() == 0 and ledger.balances() == [] and ledger.heads() == []
    assert ledger.verify().ok


def test_conflicting_receipt_for_same_slot_is_refused(ledger, keys):
    v, n = keys["v"][0], keys["n"][0]
    s = sid()
    ledger.ingest(*make_pair(v, n, s, 1, accepted=3, unix_ms=1000))
    with pytest.raises(ReceiptRejected) as info:
        ledger.ingest(*make_pair(v, n, s, 1, accepted=5, unix_ms=2000))
    assert info.value.code == "conflict"
    assert ledger.count_receipts() == 1 and ledger.balance(n.peer_id).balance == 3


def test_session_reused_for_another_node_is_refused_without_orphans(ledger, keys):
    v = keys["v"][0]
    s = sid()
    ledger.ingest(*make_pair(v, keys["n"][0], s, 1))
    # keys["n"][2] is new to this ledger: its peer row must not survive the refusal.
    with pytest.raises(ReceiptRejected) as info:
        ledger.ingest(*make_pair(v, keys["n"][2], s, 2))
    assert info.value.code == "session_conflict"
    assert ledger.verify().ok


def test_group_commit_from_threads(ledger, keys):
    """Many threads at once (as trio.to_thread does): all stored, one linear chain."""
    v, nodes = keys["v"][0], keys["n"]
    pairs = [make_pair(v, nodes[i % 3], bytes([i]) * 16, q) for i in range(8) for q in range(1, 11)]
    results: list = []
    lock = threading.Lock()

    def work(chunk):
        for p in chunk:
            r = ledger.ingest(*p)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=work, args=(pairs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.chain_index for r in results) == list(range(80))
    assert {r.status for r in results} == {STORED}
    rep = ledger.verify()
    assert rep.ok and rep.receipts == 80


# ---------------------------------------------------------------- double entry (property)

op_strategy = st.lists(
    st.tuples(
        st.integers(0, 1),  # verifier
        st.integers(0, 2),  # node
        st.integers(0, 3),  # session slot
        st.integers(0, 16),  # drafted
        st.floats(0, 1),  # accepted fraction
        st.sampled_from(["new", "new", "new", "again", "bad"]),
    ),
    max_size=12,
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=op_strategy, batch=st.booleans())
def test_balances_sum_to_zero_after_any_ingests(ledger, keys, ops, batch):
    before = {b.account: b.balance for b in ledger.balances()}
    n_before = ledger.count_receipts()
    sessions = {}  # slot -> (verifier, node, session id, next seq)
    done: list[tuple[bytes, bytes]] = []
    expect: dict[str, int] = {}
    todo: list[tuple[bytes, bytes]] = []
    for vi, ni, slot, drafted, frac, kind in ops:
        if kind == "again" and done:
            todo.append(done[len(done) // 2])
            continue
        if slot not in sessions:
            sessions[slot] = [keys["v"][vi], keys["n"][ni], os.urandom(16), 1]
        v, n, s, seq = sessions[slot]
        accepted = int(drafted * frac)
        pair = make_pair(v, n, s, seq, drafted=drafted, accepted=accepted)
        if kind == "bad":
            todo.append((_flip_last_byte(pair[0]), pair[1]))
            continue
        sessions[slot][3] += 1
        done.append(pair)
        todo.append(pair)
        expect[n.peer_id] = expect.get(n.peer_id, 0) + accepted
        expect[v.peer_id] = expect.get(v.peer_id, 0) + drafted
    if batch:
        ledger.ingest_many(todo)
    else:
        for p in todo:
            try:
                ledger.ingest(*p)
            except ReceiptRejected:
                pass
    after = {b.account: b.balance for b in ledger.balances()}
    assert sum(after.values()) == 0
    assert ledger.count_receipts() == n_before + len(done)
    for peer, amount in expect.items():
        assert after[peer] - before.get(peer, 0) == amount
    issued = sum(expect.values())
    assert after.get(NETWORK_ACCOUNT, 0) - before.get(NETWORK_ACCOUNT, 0) == -issued


def test_ledger_still_verifies_after_property_run(ledger, keys):
    rng = random.Random(5)
    pairs = [
        make_pair(rng.choice(keys["v"]), rng.choice(keys["n"]), bytes([i]) * 16, 1, rng=rng)
        for i in range(30)
    ]
    ledger.ingest_many(pairs + pairs[:5])
    assert ledger.verify().ok and sum(b.balance for b in ledger.balances()) == 0


# ---------------------------------------------------------------- node side


def test_node_keeps_its_own_receipts_and_proves_credit(tmp_path, keys, ledger_url):
    """A node ingests the receipts it got from two verifiers into its own SQLite file,
    then hands them over (`dump`) to any other ledger, which re-checks them all."""
    node = keys["n"][0]
    mine = open_ledger(tmp_path / "node.sqlite3", name="node")
    accepted = 0
    for i, v in enumerate(keys["v"]):
        s = bytes([i + 1]) * 16
        for seq in range(1, 6):
            mine.ingest(*make_pair(v, node, s, seq, drafted=6, accepted=seq))
            accepted += seq
    assert mine.balance(node.peer_id).balance == accepted
    assert mine.verify().ok
    dump = tmp_path / "receipts.jsonl"
    assert (
        ledger_cli.main(["--ledger", str(tmp_path / "node.sqlite3"), "dump", "-o", str(dump)]) == 0
    )
    mine.close()
    assert ledger_cli.main(["--ledger", ledger_url, "--json", "ingest", str(dump)]) == 0
    with open_ledger(ledger_url) as other:
        assert other.balance(node.peer_id).balance == accepted
        assert other.verify().ok


# ---------------------------------------------------------------- cost


def test_cost_per_million_tokens_and_baselines(ledger, keys):
    v, n = keys["v"][0], keys["n"][0]
    s = sid()
    # 2 rounds: 3 + 1 accepted -> 6 tokens served; 1 s verify and 10 s drafting in all.
    ledger.ingest(
        *make_pair(v, n, s, 1, drafted=4, accepted=3, verify_micros=600_000, draft_micros=4_000_000)
    )
    ledger.ingest(
        *make_pair(v, n, s, 2, drafted=4, accepted=1, verify_micros=400_000, draft_micros=6_000_000)
    )
    rep = ledger.cost()
    o = rep.overall
    assert (o.receipts, o.tokens) == (2, 6)
    assert o.server_usd == pytest.approx(1.0 * 5.05 / 3600)
    assert o.edge_usd == pytest.approx(10.0 * 0.35 / 3600)
    assert o.usd_per_mtok == pytest.approx((5.05 + 3.5) / 3600 / 6 * 1e6)
    assert [c.key for c in rep.by_node] == [n.peer_id]
    assert [c.key for c in rep.by_verifier] == [v.peer_id]
    assert [c.key for c in rep.by_session] == [s.hex()]

    ledger.set_price("server", 2.0, "H100")
    p = ledger.prices()
    assert (p.server_usd_per_hour, p.server_hardware, p.edge_usd_per_hour) == (2.0, "H100", 0.35)
    assert ledger.cost().overall.server_usd == pytest.approx(2.0 / 3600)
    with pytest.raises(ValueError):
        ledger.set_price("gpu", 1.0)

    ledger.record_baseline("autoregressive", tokens=100, server_seconds=36.0)
    ledger.record_baseline("server_only", tokens=100, server_seconds=18.0, label="run 1")
    base = {b.key: b for b in ledger.cost().baselines}
    assert base["autoregressive"].usd_per_mtok == pytest.approx(36 * 2.0 / 3600 / 100 * 1e6)
    assert base["server_only"].total_usd == pytest.approx(18 * 2.0 / 3600)


# ---------------------------------------------------------------- CLI


def _run_json(capsys, url, *argv):
    capsys.readouterr()
    rc = ledger_cli.main(["--ledger", url, *argv])
    return rc, json.loads(capsys.readouterr().out)


def test_cli_commands(ledger_url, keys, capsys, tmp_path):
    v, n = keys["v"][0], keys["n"][0]
    s = sid()
    with open_ledger(ledger_url) as led:
        for q in range(1, 4):
            led.ingest(*make_pair(v, n, s, q, drafted=5, accepted=2, unix_ms=1_763_800_000_000 + q))

    rc, out = _run_json(capsys, ledger_url, "--json", "balance")
    assert rc == 0 and out["sum_of_all_balances"] == 0
    assert {b["account"]: b["balance"] for b in out["balances"]}[n.peer_id] == 6
    rc, out = _run_json(capsys, ledger_url, "balance", n.peer_id, "--json")
    assert out["balances"][0]["balance"] == 6
    rc, out = _run_json(capsys, ledger_url, "receipts", "--node", n.peer_id, "--json")
    assert [r["seq"] for r in out["receipts"]] == [3, 2, 1]
    rc, out = _run_json(
        capsys, ledger_url, "receipts", "--session", s.hex(), "--since", "1763800000.002", "--json"
    )
    assert [r["seq"] for r in out["receipts"]] == [3, 2]
    rc, out = _run_json(
        capsys, ledger_url, "receipts", "--verifier", keys["v"][1].peer_id, "--json"
    )
    assert out["receipts"] == []
    rc, out = _run_json(capsys, ledger_url, "top", "--json")
    assert out["top"][0]["node"] == n.peer_id and out["top"][0]["accepted"] == 6
    rc, out = _run_json(capsys, ledger_url, "top", "--by", "credit", "--json")
    assert out["top"][0]["account"] == v.peer_id
    rc, out = _run_json(capsys, ledger_url, "cost", "--json")
    assert out["overall"]["tokens"] == 9
    rc, out = _run_json(capsys, ledger_url, "verify", "--json")
    assert rc == 0 and out["ok"] and out["receipts"] == 3
    rc, heads = _run_json(capsys, ledger_url, "heads", "--json")
    assert heads["heads"][0]["length"] == 3
    rc, out = _run_json(capsys, ledger_url, "export", "--format", "json")
    assert {p["peer_id"]: p["accepted"] for p in out["peers"]}[n.peer_id] == 6
    rc, out = _run_json(capsys, ledger_url, "prices", "edge", "0.5", "--json")
    assert out["edge_usd_per_hour"] == 0.5
    rc, out = _run_json(
        capsys,
        ledger_url,
        "baseline",
        "autoregressive",
        "--tokens",
        "10",
        "--server-seconds",
        "2",
        "--json",
    )
    assert out["baselines"][0]["key"] == "autoregressive"

    capsys.readouterr()
    assert ledger_cli.main(["--ledger", ledger_url, "export", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("peer_id,total_credit,expavg_credit")
    assert len(lines) == 3  # header, node, verifier
    for cmd in (["balance"], ["receipts"], ["top"], ["cost"], ["verify"], ["heads"], ["prices"]):
        assert ledger_cli.main(["--ledger", ledger_url, *cmd]) == 0
        assert capsys.readouterr().out.strip()

    # A newer receipt then anchored truncation: heads saved earlier catch a dropped tail.
    anchor = tmp_path / "heads.json"
    anchor.write_text(json.dumps(heads))
    assert ledger_cli.main(["--ledger", ledger_url, "verify", "--anchor", str(anchor)]) == 0


def test_cli_unreachable_database_exit_code(capsys, tmp_path):
    rc = ledger_cli.main(["--ledger", str(tmp_path / "missing" / "dir" / "l.sqlite3"), "balance"])
    assert rc == 3


def test_parse_since():
    now = 1_000_000.0
    assert ledger_cli.parse_since("2h", now) == int((now - 7200) * 1000)
    assert ledger_cli.parse_since("1763800000", now) == 1_763_800_000_000
    assert ledger_cli.parse_since("1763800000123", now) == 1_763_800_000_123
    assert ledger_cli.parse_since("1970-01-02", now) == 86_400_000


# ---------------------------------------------------------------- schema


def test_migrations_match_models(ledger):
    assert current_revision(ledger.engine) == "0002_fraud_proofs"
    with ledger.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_open_is_idempotent_and_defaults_to_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("SPECEDGE_LEDGER", raising=False)
    with open_ledger(None) as a:
        assert a.url.endswith("/specedge/ledger.sqlite3") and str(tmp_path) in a.url
    with open_ledger(None) as b:
        assert current_revision(b.engine) == "0002_fraud_proofs"
    # $SPECEDGE_LEDGER names the verifier's ledger; a node's own file is never redirected.
    monkeypatch.setenv("SPECEDGE_LEDGER", str(tmp_path / "elsewhere.sqlite3"))
    with open_ledger(None) as c, open_ledger(None, name="node") as d:
        assert c.url.endswith("/elsewhere.sqlite3")
        assert d.url.endswith("/specedge/node.sqlite3")
