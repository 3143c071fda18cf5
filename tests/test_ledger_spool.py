"""Spool-and-flush across a database outage: nothing lost, nothing doubled.

PostgreSQL outages are made with a TCP proxy between the ledger and the shared server:
"down" drops every open connection and refuses new ones, "up" lets them through again.
The shared server itself is never touched. SQLite outages use a file whose directory
does not exist yet.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import threading
import time

import pytest
import sqlalchemy as sa

from specedge.ledger import SPOOLED, STORED, ReceiptRejected, SpoolingLedger, open_ledger
from specedge.ledger import cli as ledger_cli
from specedge.ledger.testing import PG_TEST_URL, make_pair, make_peers, pg_available, pg_schema


class OutageProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL until told to fail."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = True
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()  # the database "is down": the connection dies at once
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def down(self) -> None:
        self.up = False
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.down()
        self.listener.close()


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    d = tmp_path_factory.mktemp("ids")
    return make_peers(d, 1, "v")[0], make_peers(d, 2, "n")


def _pairs(peers, n, seed):
    """n receipts over two sessions (one per node), seqs in order within each."""
    v, nodes = peers
    rng = random.Random(seed)
    sids = [rng.randbytes(16), rng.randbytes(16)]
    return [
        make_pair(
            v, nodes[i % 2], sids[i % 2], i // 2 + 1, drafted=5, accepted=rng.randint(0, 5), rng=rng
        )
        for i in range(n)
    ]


def _check_ledger(url, pairs):
    from specedge.protocol.envelopes import open_receipt

    with open_ledger(url) as led:
        assert led.count_receipts() == len(pairs)
        rep = led.verify()
        assert rep.ok, rep.problems[:3]
        assert sum(b.balance for b in led.balances()) == 0
        node_total = sum(open_receipt(p[0])[1].accepted for p in pairs)
        v_total = sum(open_receipt(p[0])[1].drafted for p in pairs)
        nodes = [b for b in led.balances() if b.draft_credit > 0 or b.account.startswith("12")]
        assert sum(b.draft_credit for b in nodes) == node_total
        assert sum(b.verify_credit for b in nodes) == v_total


@pytest.mark.postgres
def test_postgres_outage_spools_then_flushes(peers, tmp_path):
    if not pg_available():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is not reachable")
    target = sa.make_url(PG_TEST_URL)
    proxy = OutageProxy((target.host or "127.0.0.1", target.port or 5432))
    pairs = _pairs(peers, 30, seed=1)
    try:
        with pg_schema() as direct_url:
            via = sa.make_url(direct_url).set(host="127.0.0.1", port=proxy.port)
            url = via.update_query_dict({"connect_timeout": "2"}).render_as_string(False)
            spool = tmp_path / "spool"
            with SpoolingLedger(url, spool, retry_interval=0) as sl:
                assert [sl.ingest(*p).status for p in pairs[:10]] == [STORED] * 10

                proxy.down()  # mid-session: pooled connections die, new ones are refused
                assert [sl.ingest(*p).status for p in pairs[10:20]] == [SPOOLED] * 10
                assert sl.pending() == 10
                # A bad receipt is refused at once, outage or not; it is never spooled.
                with pytest.raises(ReceiptRejected):
                    bad = pairs[20][0][:-1] + bytes([pairs[20][0][-1] ^ 1])  # always differs
                    sl.ingest(bad, pairs[20][1])
                assert sl.pending() == 10
                first_file = sorted(spool.glob("*.rcpt"))[0]
                survivor = tmp_path / "copy-of-one-spool-file"
                shutil.copy(first_file, survivor)

                proxy.restore()
                # The next ingest flushes the backlog first, in order, then stores its own.
                assert sl.ingest(*pairs[20]).status == STORED
                assert sl.pending() == 0
                # A crash between a flush commit and the unlink leaves the file behind:
                # flushing it again changes nothing.
                shutil.copy(survivor, first_file)
                res = sl.flush()
                assert (res.stored, res.duplicate, res.remaining) == (0, 1, 0)
                assert [sl.ingest(*p).status for p in pairs[21:]] == [STORED] * 9
                # And everything submitted again is a duplicate.
                assert {sl.ingest(*p).status for p in pairs} == {"duplicate"}
            _check_ledger(direct_url, pairs)
    finally:
        proxy.close()


def test_sqlite_unreachable_at_start_then_flushed(peers, tmp_path):
    url = str(tmp_path / "not-yet" / "ledger.sqlite3")  # its directory does not exist
    pairs = _pairs(peers, 12, seed=2)
    spool = tmp_path / "spool"
    with SpoolingLedger(url, spool, retry_interval=0) as sl:
        assert sl.ledger is None
        assert [sl.ingest(*p).status for p in pairs[:8]] == [SPOOLED] * 8
        assert sl.flush().database_up is False and sl.pending() == 8
        (tmp_path / "not-yet").mkdir()  # the database is back
        res = sl.flush()
        assert (res.stored, res.duplicate, res.remaining, res.database_up) == (8, 0, 0, True)
        assert [sl.ingest(*p).status for p in pairs[8:]] == [STORED] * 4
    _check_ledger(url, pairs)


def test_background_flush_and_cli_flush(peers, tmp_path):
    url = str(tmp_path / "later" / "ledger.sqlite3")
    pairs = _pairs(peers, 6, seed=3)
    spool = tmp_path / "spool"
    with SpoolingLedger(url, spool, retry_interval=0.05) as sl:
        for p in pairs[:3]:
            assert sl.ingest(*p).status == SPOOLED
        sl.start_background_flush(interval=0.05)
        (tmp_path / "later").mkdir()
        deadline = time.monotonic() + 10
        while sl.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sl.pending() == 0
    # The operator's way: spooled by one process, flushed by `specedge-ledger flush`.
    other = tmp_path / "other-spool"
    with SpoolingLedger(str(tmp_path / "nowhere" / "x.sqlite3"), other) as sl:
        for p in pairs[3:]:
            assert sl.ingest(*p).status == SPOOLED
    assert ledger_cli.main(["--ledger", url, "flush", str(other)]) == 0
    assert not list(other.glob("*.rcpt"))
    _check_ledger(url, pairs)


def test_spool_files_are_whole_or_absent(peers, tmp_path):
    """Half-written temp files (a crash inside ingest) are dropped; a corrupt file is set
    aside in rejected/ rather than blocking the spool."""
    url = str(tmp_path / "down" / "ledger.sqlite3")
    spool = tmp_path / "spool"
    pairs = _pairs(peers, 3, seed=4)
    with SpoolingLedger(url, spool, retry_interval=0) as sl:
        for p in pairs:
            sl.ingest(*p)
    files = sorted(spool.glob("*.rcpt"))
    assert len(files) == 3 and all(os.stat(f).st_mode & 0o077 == 0 for f in files)
    (spool / ".tmp-00000000000000000000-1-00000000-deadbeef.rcpt").write_bytes(b"partial")
    data = bytearray(files[1].read_bytes())
    data[40] ^= 0xFF
    files[1].write_bytes(bytes(data))
    (tmp_path / "down").mkdir()
    with SpoolingLedger(url, spool, retry_interval=0) as sl:
        assert not list(spool.glob(".tmp-*"))
        res = sl.flush()
        assert (res.stored, res.rejected, res.remaining) == (2, 1, 0)
    assert (spool / "rejected" / files[1].name).exists()
    assert "corrupt" in (spool / "rejected" / (files[1].name + ".reason")).read_text()
    with open_ledger(url) as led:
        assert led.count_receipts() == 2 and led.verify().ok


def test_unexpected_write_error_spools_instead_of_losing(peers, tmp_path, monkeypatch):
    url = str(tmp_path / "ledger.sqlite3")
    pairs = _pairs(peers, 4, seed=5)
    with SpoolingLedger(url, tmp_path / "spool", retry_interval=0) as sl:
        assert sl.ingest(*pairs[0]).status == STORED

        def broken(checked):
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(sl.ledger, "store_one", broken)
        assert sl.ingest(*pairs[1]).status == SPOOLED
        monkeypatch.undo()
        assert [sl.ingest(*p).status for p in pairs[2:]] == [STORED, STORED]
        assert sl.pending() == 0
    _check_ledger(url, pairs)
