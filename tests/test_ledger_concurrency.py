"""Several writer processes on one ledger: chains stay linear, nothing lost or doubled."""

from __future__ import annotations

import random

import pytest

from specedge.ledger import open_ledger
from specedge.ledger.testing import (
    make_pair,
    make_peers,
    pg_available,
    pg_schema,
    writer_processes,
)

WORKERS = 4


def _run_writers(url, keys_dir):
    vs, ns = make_peers(keys_dir, 2, "v"), make_peers(keys_dir, 4, "n")
    rng = random.Random(11)
    shares = []
    for w in range(WORKERS):
        share = []
        for s in range(4):
            sid = bytes([w, s]) * 8
            v = vs[(w + s) % 2]  # both verifiers' chains are written by every worker
            for seq in range(1, 11):
                share.append(
                    make_pair(v, ns[w], sid, seq, drafted=7, accepted=rng.randint(0, 7), rng=rng)
                )
        shares.append(share)
    unique = sum(len(s) for s in shares)
    # Each worker also submits half of the next worker's receipts: racing duplicates.
    work = [shares[w] + shares[(w + 1) % WORKERS][::2] for w in range(WORKERS)]
    for w in work:
        random.Random(len(w)).shuffle(w)  # per-session order does not matter to the ledger

    counts = writer_processes(url, work, [1 if w < 2 else 8 for w in range(WORKERS)])
    stored = sum(c.get("stored", 0) for c in counts)
    duplicate = sum(c.get("duplicate", 0) for c in counts)
    assert stored == unique
    assert duplicate == sum(len(w) for w in work) - unique

    with open_ledger(url) as led:
        assert led.count_receipts() == unique
        heads = led.heads()
        assert sorted(h.length for h in heads) == sorted(
            sum(1 for w in range(WORKERS) for s in range(4) if (w + s) % 2 == i) * 10
            for i in (0, 1)
        )
        rep = led.verify()
        assert rep.ok, rep.problems[:5]
        assert sum(b.balance for b in led.balances()) == 0
        for w in range(WORKERS):
            want = sum(_accepted(p) for p in shares[w])  # each receipt counted once
            assert led.balance(ns[w].peer_id).balance == want


def _accepted(pair):
    from specedge.protocol.envelopes import open_receipt

    return open_receipt(pair[0])[1].accepted


@pytest.mark.postgres
def test_four_writer_processes_on_postgres(tmp_path):
    if not pg_available():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is not reachable")
    with pg_schema() as url:
        _run_writers(url, tmp_path)


def test_four_writer_processes_on_sqlite(tmp_path):
    _run_writers(str(tmp_path / "ledger.sqlite3"), tmp_path)
