"""The ledger: ingest of signed receipts, and the queries the CLI shows.

Thread safety: one `Ledger` may be shared by threads (the verifier calls `ingest` from
trio via `trio.to_thread.run_sync`). Each call takes its own pooled connection; on
SQLite, writes in one process are also serialised by a lock, because SQLite has one
writer at a time anyway and waiting on a Python lock is cheaper than on busy_timeout.
Several processes may write one PostgreSQL ledger (see `_lock_head` for how each
verifier's chain stays linear) or one SQLite file (BEGIN IMMEDIATE serialises them).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

from sqlalchemy import Connection, Engine, case, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import aliased

from specedge.ledger import accounting, chain, db
from specedge.ledger.checks import CheckedReceipt, LedgerError, ReceiptRejected, check_pair
from specedge.ledger.schema import (
    baselines,
    chain_heads,
    credit_entries,
    peers,
    prices,
    receipts,
    sessions,
)

STORED = "stored"
DUPLICATE = "duplicate"
SPOOLED = "spooled"
REJECTED = "rejected"

_RETRY_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected
_MAX_ATTEMPTS = 6


class LedgerUnavailable(LedgerError):
    """The database cannot be reached (or failed mid-write); nothing is known stored."""


@dataclass(frozen=True)
class IngestResult:
    """What happened to one receipt.

    status: "stored" (new chain row), "duplicate" (already in the ledger with the same
    bytes; counted once), "spooled" (database down; on local disk, flushed later) or
    "rejected" (only from `ingest_many`; `ingest` raises ReceiptRejected instead).
    """

    status: str
    verifier: str | None = None
    node: str | None = None
    session_id: bytes | None = None
    seq: int | None = None
    chain_index: int | None = None
    row_hash: bytes | None = None
    error: ReceiptRejected | None = None

    @classmethod
    def of(cls, c: CheckedReceipt, status: str, **kw: object) -> IngestResult:
        return cls(status, c.verifier, c.node, c.session_id, c.seq, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Balance:
    account: str
    balance: int
    draft_credit: int
    verify_credit: int
    entries: int


@dataclass(frozen=True)
class ReceiptInfo:
    id: int
    verifier: str
    node: str
    session_id: str  # hex
    seq: int
    drafted: int
    accepted: int
    verify_micros: int
    draft_micros: int
    unix_ms: int
    model_id: str
    chain_index: int
    row_hash: str  # hex


@dataclass(frozen=True)
class ChainHeadInfo:
    verifier: str
    length: int
    head_hash: str  # hex


@dataclass
class CostReport:
    prices: accounting.Prices
    overall: accounting.CostLine
    by_verifier: list[accounting.CostLine]
    by_node: list[accounting.CostLine]
    by_session: list[accounting.CostLine]
    baselines: list[accounting.CostLine] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "prices": asdict(self.prices),
            "overall": self.overall.to_dict(),
            "by_verifier": [c.to_dict() for c in self.by_verifier],
            "by_node": [c.to_dict() for c in self.by_node],
            "by_session": [c.to_dict() for c in self.by_session],
            "baselines": [c.to_dict() for c in self.baselines],
        }


@dataclass(frozen=True)
class PeerStats:
    """Per-peer totals, in the spirit of BOINC's user/host statistics exports."""

    peer_id: str
    total_credit: int
    expavg_credit: float  # exponentially decaying credit per day, half-life 7 days
    draft_credit: int
    verify_credit: int
    receipts_as_node: int
    receipts_as_verifier: int
    drafted: int
    accepted: int
    acceptance_rate: float | None
    tokens_verified: int
    draft_seconds: float
    verify_seconds: float
    sessions_as_node: int
    sessions_as_verifier: int
    first_unix_ms: int | None
    last_unix_ms: int | None


EXPAVG_HALF_LIFE_DAYS = 7.0
_DAY_MS = 86_400_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _is_unavailable(exc: sa_exc.DBAPIError) -> bool:
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) or bool(
        exc.connection_invalidated
    )


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(getattr(exc, "orig", None), "sqlstate", None)


class _Slot:
    __slots__ = ("checked", "done", "exc", "result")

    def __init__(self, checked: CheckedReceipt) -> None:
        self.checked = checked
        self.done = False
        self.result: IngestResult | None = None
        self.exc: BaseException | None = None


class Ledger:
    """A ledger database. Build it with `open_ledger`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._insert = pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert
        self._write_lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()
        )
        # Committed ids only (filled after COMMIT): peer_id -> pk; (verifier pk, session
        # id) -> (session pk, node pk, model id). Rows are never deleted by the ledger.
        self._cache_lock = threading.Lock()
        # Group commit (store_one): waiting receipts, and the lock one committer holds.
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._queue: list[_Slot] = []
        self._peer_pk: dict[str, int] = {}
        self._session: dict[tuple[int, bytes], tuple[int, int, str]] = {}

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ ingest

    def ingest(self, receipt_envelope: bytes, request_envelope: bytes) -> IngestResult:
        """Check and record one receipt.

        Returns status "stored" or "duplicate" (same (verifier, session, seq) with the same
        bytes: counted once). Raises ReceiptRejected for anything that fails a check (bad
        signature, digest or peer mismatch, or a different receipt for a (verifier,
        session, seq) already recorded), LedgerUnavailable when the database is down.
        """
        result = self.store_one(check_pair(receipt_envelope, request_envelope))
        if result.error is not None:
            raise result.error
        return result

    def store_one(self, checked: CheckedReceipt) -> IngestResult:
        """Store one checked receipt with group commit.

        Threads that call this together share one transaction: while one commit is in
        flight (an fsync, milliseconds), the receipts that arrive queue up and the next
        thread to get the commit lock stores all of them. Each caller still returns only
        after its own receipt is committed, so durability is the same as one transaction
        per receipt, at a fraction of the fsyncs.
        """
        slot = _Slot(checked)
        with self._queue_lock:
            self._queue.append(slot)
        with self._commit_lock:
            if not slot.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    results = self.store([s.checked for s in batch])
                except BaseException as exc:
                    for s in batch:
                        s.exc, s.done = exc, True
                else:
                    for s, r in zip(batch, results, strict=True):
                        s.result, s.done = r, True
        if slot.exc is not None:
            raise slot.exc
        assert slot.result is not None
        return slot.result

    def ingest_many(self, pairs: Iterable[tuple[bytes, bytes]]) -> list[IngestResult]:
        """Like `ingest` for many (receipt, request) pairs in one transaction.

        Never raises ReceiptRejected: a refused pair gets status "rejected" with `error`
        set, and the others are still stored. Results are in input order.
        """
        results: list[IngestResult | None] = []
        good: list[tuple[int, CheckedReceipt]] = []
        for i, (receipt_env, request_env) in enumerate(pairs):
            try:
                good.append((i, check_pair(receipt_env, request_env)))
                results.append(None)
            except ReceiptRejected as exc:
                results.append(IngestResult(REJECTED, error=exc))
        for (i, _), res in zip(good, self.store([c for _, c in good]), strict=True):
            results[i] = res
        return results  # type: ignore[return-value]

    def store(self, items: Sequence[CheckedReceipt]) -> list[IngestResult]:
        """Record receipts that `check_pair` accepted, in one transaction.

        Retries PostgreSQL deadlocks and serialization failures; maps connection
        failures to LedgerUnavailable.
        """
        if not items:
            return []
        with self._write_lock:
            for attempt in range(_MAX_ATTEMPTS):
                try:
                    with self.engine.connect() as conn:
                        conn.execution_options(**{db.WRITE: True})
                        with conn.begin():
                            out, peers_new, sessions_new = self._store_tx(conn, items)
                    with self._cache_lock:
                        self._peer_pk.update(peers_new)
                        self._session.update(sessions_new)
                    return out
                except sa_exc.DBAPIError as exc:
                    if _sqlstate(exc) in _RETRY_SQLSTATES and attempt + 1 < _MAX_ATTEMPTS:
                        time.sleep(0.005 * 2**attempt)
                        continue
                    if _is_unavailable(exc):
                        raise LedgerUnavailable(str(exc.orig or exc)) from exc
                    raise
        raise AssertionError("unreachable")

    def _store_tx(
        self, conn: Connection, items: Sequence[CheckedReceipt]
    ) -> tuple[list[IngestResult], dict[str, int], dict[tuple[int, bytes], tuple[int, int, str]]]:
        now = _now_ms()
        pk, new_peers = self._ensure_peers(conn, items)
        sess, new_sessions = self._ensure_sessions(conn, items, pk)
        results: list[IngestResult | None] = [None] * len(items)
        by_verifier: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(items):
            by_verifier[c.verifier].append(i)

        rows: list[dict[str, object]] = []
        row_items: list[CheckedReceipt] = []
        used_sessions: set[tuple[int, bytes]] = set()
        used_peers: set[str] = set()
        # Sorted lock order: two batches that touch the same verifiers cannot deadlock.
        for verifier in sorted(by_verifier, key=lambda v: pk[v]):
            vpk = pk[verifier]
            idxs = by_verifier[verifier]
            length, head = self._lock_head(conn, vpk, verifier)
            # Read after the lock: under READ COMMITTED this sees every receipt that an
            # earlier holder of this verifier's lock committed.
            s_pks = {sess[(vpk, items[i].session_id)][0] for i in idxs}
            seqs = {items[i].seq for i in idxs}
            existing: dict[tuple[int, int], tuple[bytes, int, bytes]] = {}
            for r in conn.execute(
                select(
                    receipts.c.session_pk,
                    receipts.c.seq,
                    receipts.c.receipt_envelope,
                    receipts.c.chain_index,
                    receipts.c.row_hash,
                ).where(receipts.c.session_pk.in_(s_pks), receipts.c.seq.in_(seqs))
            ):
                existing[(r.session_pk, r.seq)] = (
                    bytes(r.receipt_envelope),
                    r.chain_index,
                    bytes(r.row_hash),
                )
            start = length
            for i in idxs:
                c = items[i]
                s_pk, s_node, s_model = sess[(vpk, c.session_id)]
                if s_node != pk[c.node] or s_model != c.model_id:
                    results[i] = IngestResult.of(
                        c,
                        REJECTED,
                        error=ReceiptRejected(
                            "session_conflict",
                            "this verifier's session is recorded with another node or model",
                        ),
                    )
                    continue
                prior = existing.get((s_pk, c.seq))
                if prior is not None:
                    if prior[0] == c.receipt_envelope:
                        results[i] = IngestResult.of(
                            c, DUPLICATE, chain_index=prior[1], row_hash=prior[2]
                        )
                    else:
                        # Two different signed receipts for one request slot: keep the first.
                        results[i] = IngestResult.of(
                            c,
                            REJECTED,
                            error=ReceiptRejected(
                                "conflict",
                                f"another receipt for session {c.session_id.hex()} seq {c.seq} "
                                "is already recorded",
                            ),
                        )
                    continue
                row_hash = chain.link_hash(head, length, now, c.receipt_envelope, c.request_sha256)
                rows.append(
                    {
                        "verifier_pk": vpk,
                        "node_pk": pk[c.node],
                        "session_pk": s_pk,
                        "seq": c.seq,
                        "request_sha256": c.request_sha256,
                        "drafted": c.drafted,
                        "accepted": c.accepted,
                        "verify_micros": c.verify_micros,
                        "draft_micros": c.draft_micros,
                        "unix_ms": c.unix_ms,
                        "model_id": c.model_id,
                        "receipt_envelope": c.receipt_envelope,
                        "request_envelope": c.request_envelope,
                        "chain_index": length,
                        "ingested_ms": now,
                        "prev_hash": head,
                        "row_hash": row_hash,
                    }
                )
                row_items.append(c)
                existing[(s_pk, c.seq)] = (c.receipt_envelope, length, row_hash)
                results[i] = IngestResult.of(c, STORED, chain_index=length, row_hash=row_hash)
                used_sessions.add((vpk, c.session_id))
                used_peers.update((c.verifier, c.node))
                length += 1
                head = row_hash
            if length != start:
                conn.execute(
                    chain_heads.update()
                    .where(chain_heads.c.verifier_pk == vpk)
                    .values(length=length, head_hash=head)
                )
            elif length == 0:
                # A head made just now for a verifier whose receipts were all refused.
                conn.execute(chain_heads.delete().where(chain_heads.c.verifier_pk == vpk))

        if rows:
            ids = (
                conn.execute(
                    receipts.insert().returning(receipts.c.id, sort_by_parameter_order=True), rows
                )
                .scalars()
                .all()
            )
            legs = [
                {"receipt_pk": rid, "account": acct, "kind": kind, "amount": amount}
                for rid, c in zip(ids, row_items, strict=True)
                for acct, kind, amount in accounting.credit_legs(
                    c.node, c.verifier, c.drafted, c.accepted
                )
            ]
            conn.execute(credit_entries.insert(), legs)

        # Rows made in this transaction for receipts that were then refused would be
        # orphans that `verify` reports as forged; remove them before committing.
        for key in [k for k in new_sessions if k not in used_sessions]:
            conn.execute(sessions.delete().where(sessions.c.id == new_sessions.pop(key)[0]))
        for peer in [p for p in new_peers if p not in used_peers]:
            ppk = new_peers.pop(peer)
            conn.execute(chain_heads.delete().where(chain_heads.c.verifier_pk == ppk))
            conn.execute(peers.delete().where(peers.c.id == ppk))
        found_peers = {p: pk[p] for p in used_peers}
        found_sessions = {k: sess[k] for k in used_sessions}
        return results, found_peers, found_sessions  # type: ignore[return-value]

    def _ensure_peers(
        self, conn: Connection, items: Sequence[CheckedReceipt]
    ) -> tuple[dict[str, int], dict[str, int]]:
        keys: dict[str, bytes] = {}
        for c in items:
            keys[c.verifier] = c.verifier_key
            keys[c.node] = c.node_key
        with self._cache_lock:
            pk = {p: self._peer_pk[p] for p in keys if p in self._peer_pk}
        new: dict[str, int] = {}
        missing = sorted(p for p in keys if p not in pk)
        if missing:
            for r in conn.execute(
                select(peers.c.peer_id, peers.c.id, peers.c.public_key).where(
                    peers.c.peer_id.in_(missing)
                )
            ):
                if bytes(r.public_key) != keys[r.peer_id]:
                    raise LedgerError(f"peer {r.peer_id} is recorded with another public key")
                pk[r.peer_id] = r.id
            # Sorted inserts: concurrent writers wait on each other's new rows in one order.
            for p in sorted(p for p in keys if p not in pk):
                got = conn.execute(
                    self._insert(peers)
                    .values(peer_id=p, public_key=keys[p])
                    .on_conflict_do_nothing()
                    .returning(peers.c.id)
                ).scalar()
                if got is None:  # another writer committed it meanwhile
                    got = conn.execute(select(peers.c.id).where(peers.c.peer_id == p)).scalar_one()
                else:
                    new[p] = got
                pk[p] = got
        return pk, new

    def _ensure_sessions(
        self, conn: Connection, items: Sequence[CheckedReceipt], pk: dict[str, int]
    ) -> tuple[
        dict[tuple[int, bytes], tuple[int, int, str]], dict[tuple[int, bytes], tuple[int, int, str]]
    ]:
        first: dict[tuple[int, bytes], CheckedReceipt] = {}
        for c in items:
            first.setdefault((pk[c.verifier], c.session_id), c)
        with self._cache_lock:
            sess = {k: self._session[k] for k in first if k in self._session}
        new: dict[tuple[int, bytes], tuple[int, int, str]] = {}
        for key in sorted(k for k in first if k not in sess):
            vpk, sid = key
            r = conn.execute(
                select(sessions.c.id, sessions.c.node_pk, sessions.c.model_id).where(
                    sessions.c.verifier_pk == vpk, sessions.c.session_id == sid
                )
            ).first()
            if r is None:
                c = first[key]
                got = conn.execute(
                    self._insert(sessions)
                    .values(
                        verifier_pk=vpk, node_pk=pk[c.node], session_id=sid, model_id=c.model_id
                    )
                    .on_conflict_do_nothing()
                    .returning(sessions.c.id)
                ).scalar()
                if got is not None:
                    sess[key] = new[key] = (got, pk[c.node], c.model_id)
                    continue
                r = conn.execute(
                    select(sessions.c.id, sessions.c.node_pk, sessions.c.model_id).where(
                        sessions.c.verifier_pk == vpk, sessions.c.session_id == sid
                    )
                ).one()
            sess[key] = (r.id, r.node_pk, r.model_id)
        return sess, new

    def _lock_head(self, conn: Connection, vpk: int, verifier: str) -> tuple[int, bytes]:
        """Lock one verifier's chain head for this transaction and return (length, hash).

        PostgreSQL: SELECT ... FOR UPDATE on the verifier's chain_heads row. Writers of one
        verifier queue on that row and each appends after the previous one's commit, so
        the chain stays linear; writers of other verifiers are not blocked at all. Unlike
        SERIALIZABLE, nobody does the work and then has to retry it; unlike an advisory
        lock, the lock is the row we update anyway, so it cannot be forgotten or collide
        with another application's lock keys. SQLite: BEGIN IMMEDIATE already holds the
        whole database, FOR UPDATE is not rendered there.
        """
        q = (
            select(chain_heads.c.length, chain_heads.c.head_hash)
            .where(chain_heads.c.verifier_pk == vpk)
            .with_for_update()
        )
        r = conn.execute(q).first()
        if r is None:
            conn.execute(
                self._insert(chain_heads)
                .values(verifier_pk=vpk, length=0, head_hash=chain.genesis_hash(verifier))
                .on_conflict_do_nothing()
            )
            r = conn.execute(q).one()
        return r.length, bytes(r.head_hash)

    # ------------------------------------------------------------------ queries

    def _read(self) -> contextlib.AbstractContextManager[Connection]:
        return self.engine.connect()

    def balances(self) -> list[Balance]:
        """Every account's balance (peers and @network), largest first. They sum to zero."""
        draft = func.sum(
            case((credit_entries.c.kind == accounting.KIND_DRAFT, credit_entries.c.amount), else_=0)
        )
        verify = func.sum(
            case(
                (credit_entries.c.kind == accounting.KIND_VERIFY, credit_entries.c.amount), else_=0
            )
        )
        total = func.sum(credit_entries.c.amount)
        q = (
            select(credit_entries.c.account, total, draft, verify, func.count())
            .group_by(credit_entries.c.account)
            .order_by(total.desc(), credit_entries.c.account)
        )
        with self._read() as conn:
            return [Balance(a, int(t), int(d), int(v), int(n)) for a, t, d, v, n in conn.execute(q)]

    def balance(self, account: str) -> Balance:
        for b in self.balances_of([account]):
            return b
        return Balance(account, 0, 0, 0, 0)

    def balances_of(self, accounts: Sequence[str]) -> list[Balance]:
        draft = func.sum(
            case((credit_entries.c.kind == accounting.KIND_DRAFT, credit_entries.c.amount), else_=0)
        )
        verify = func.sum(
            case(
                (credit_entries.c.kind == accounting.KIND_VERIFY, credit_entries.c.amount), else_=0
            )
        )
        q = (
            select(
                credit_entries.c.account,
                func.sum(credit_entries.c.amount),
                draft,
                verify,
                func.count(),
            )
            .where(credit_entries.c.account.in_(list(accounts)))
            .group_by(credit_entries.c.account)
        )
        with self._read() as conn:
            return [Balance(a, int(t), int(d), int(v), int(n)) for a, t, d, v, n in conn.execute(q)]

    def earned_buckets(self, account: str, bucket_ms: int = 3_600_000) -> list[tuple[int, int]]:
        """An account's credit by receipt time, in buckets of `bucket_ms`: (bucket start,
        credit). What a verifier's standing decays over (verifier/standing.py)."""
        bucket = (receipts.c.unix_ms // bucket_ms) * bucket_ms
        q = (
            select(bucket, func.sum(credit_entries.c.amount))
            .select_from(credit_entries.join(receipts,
                                             receipts.c.id == credit_entries.c.receipt_pk))
            .where(credit_entries.c.account == account)
            .group_by(bucket)
        )
        with self._read() as conn:
            return [(int(at), int(amount)) for at, amount in conn.execute(q)]

    def receipts(
        self,
        *,
        node: str | None = None,
        verifier: str | None = None,
        session: bytes | None = None,
        since_ms: int | None = None,
        limit: int | None = 100,
    ) -> list[ReceiptInfo]:
        """Receipts, newest first, filtered by node, verifier, session id, receipt time."""
        vp, np_ = aliased(peers), aliased(peers)
        q = (
            select(
                receipts.c.id,
                vp.c.peer_id.label("verifier"),
                np_.c.peer_id.label("node"),
                sessions.c.session_id,
                receipts.c.seq,
                receipts.c.drafted,
                receipts.c.accepted,
                receipts.c.verify_micros,
                receipts.c.draft_micros,
                receipts.c.unix_ms,
                receipts.c.model_id,
                receipts.c.chain_index,
                receipts.c.row_hash,
            )
            .join(vp, vp.c.id == receipts.c.verifier_pk)
            .join(np_, np_.c.id == receipts.c.node_pk)
            .join(sessions, sessions.c.id == receipts.c.session_pk)
            .order_by(receipts.c.unix_ms.desc(), receipts.c.id.desc())
        )
        if node is not None:
            q = q.where(np_.c.peer_id == node)
        if verifier is not None:
            q = q.where(vp.c.peer_id == verifier)
        if session is not None:
            q = q.where(sessions.c.session_id == session)
        if since_ms is not None:
            q = q.where(receipts.c.unix_ms >= since_ms)
        if limit is not None:
            q = q.limit(limit)
        with self._read() as conn:
            return [
                ReceiptInfo(
                    r.id,
                    r.verifier,
                    r.node,
                    bytes(r.session_id).hex(),
                    r.seq,
                    r.drafted,
                    r.accepted,
                    r.verify_micros,
                    r.draft_micros,
                    r.unix_ms,
                    r.model_id,
                    r.chain_index,
                    bytes(r.row_hash).hex(),
                )
                for r in conn.execute(q)
            ]

    def top(self, by: str = "accepted", limit: int = 10) -> list[dict[str, object]]:
        """Leaders: nodes by accepted draft tokens, or peers by credit balance."""
        if by == "credit":
            return [asdict(b) for b in self.balances() if b.account != accounting.NETWORK_ACCOUNT][
                :limit
            ]
        if by != "accepted":
            raise ValueError("by must be 'accepted' or 'credit'")
        acc = func.sum(receipts.c.accepted)
        q = (
            select(
                peers.c.peer_id,
                func.count(),
                func.sum(receipts.c.drafted),
                acc,
            )
            .join(peers, peers.c.id == receipts.c.node_pk)
            .group_by(peers.c.peer_id)
            .order_by(acc.desc(), peers.c.peer_id)
            .limit(limit)
        )
        with self._read() as conn:
            return [
                {
                    "node": p,
                    "receipts": int(n),
                    "drafted": int(d),
                    "accepted": int(a),
                    "acceptance_rate": (int(a) / int(d)) if d else None,
                }
                for p, n, d, a in conn.execute(q)
            ]

    def heads(self) -> list[ChainHeadInfo]:
        """Each verifier's chain length and last hash; save them to check truncation later."""
        q = (
            select(peers.c.peer_id, chain_heads.c.length, chain_heads.c.head_hash)
            .join(peers, peers.c.id == chain_heads.c.verifier_pk)
            .order_by(peers.c.peer_id)
        )
        with self._read() as conn:
            return [ChainHeadInfo(p, n, bytes(h).hex()) for p, n, h in conn.execute(q)]

    def count_receipts(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(receipts)).scalar_one())

    # ------------------------------------------------------------------ prices and cost

    def prices(self) -> accounting.Prices:
        with self._read() as conn:
            got = {r.kind: r for r in conn.execute(select(prices))}
        d = accounting.Prices()
        s, e = got.get("server"), got.get("edge")
        return accounting.Prices(
            server_usd_per_hour=s.usd_per_hour if s else d.server_usd_per_hour,
            edge_usd_per_hour=e.usd_per_hour if e else d.edge_usd_per_hour,
            server_hardware=s.hardware if s else d.server_hardware,
            edge_hardware=e.hardware if e else d.edge_hardware,
        )

    def set_price(self, kind: str, usd_per_hour: float, hardware: str | None = None) -> None:
        """Set the $/hour of 'server' or 'edge' hardware (used by `cost`)."""
        if kind not in ("server", "edge"):
            raise ValueError("kind must be 'server' or 'edge'")
        if not (usd_per_hour >= 0 and math.isfinite(usd_per_hour)):
            raise ValueError("price must be a finite number >= 0")
        current = self.prices()
        hw = hardware or (current.server_hardware if kind == "server" else current.edge_hardware)
        stmt = self._insert(prices).values(
            kind=kind, hardware=hw, usd_per_hour=float(usd_per_hour), updated_ms=_now_ms()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[prices.c.kind],
            set_={"hardware": hw, "usd_per_hour": float(usd_per_hour), "updated_ms": _now_ms()},
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def record_baseline(
        self,
        mode: str,
        tokens: int,
        server_seconds: float,
        edge_seconds: float = 0.0,
        label: str = "",
    ) -> None:
        """Store a benchmark's timings for a mode without receipts, for `cost` to compare.

        mode: "server_only" (speculative decoding with the draft model on the server) or
        "autoregressive" (target model alone). tokens: tokens generated in that run.
        """
        if mode not in accounting.BASELINE_MODES:
            raise ValueError(f"mode must be one of {accounting.BASELINE_MODES}")
        if tokens <= 0 or server_seconds < 0 or edge_seconds < 0:
            raise ValueError("tokens must be > 0 and seconds >= 0")
        with self.engine.begin() as conn:
            conn.execute(
                baselines.insert().values(
                    mode=mode,
                    label=label,
                    tokens=int(tokens),
                    server_seconds=float(server_seconds),
                    edge_seconds=float(edge_seconds),
                    recorded_ms=_now_ms(),
                )
            )

    def cost(
        self, price: accounting.Prices | None = None, sessions_limit: int | None = 50
    ) -> CostReport:
        """$ per 1M served tokens overall, per verifier, per node and per session, plus
        benchmark baselines (summed per mode) at the same prices."""
        p = price or self.prices()
        served = func.count() + func.sum(receipts.c.accepted)  # accepted + bonus per round
        cols = (
            func.count(),
            served,
            func.sum(receipts.c.verify_micros),
            func.sum(receipts.c.draft_micros),
        )

        def lines(conn: Connection, key_col, join=None, limit=None):  # type: ignore[no-untyped-def]
            q = select(key_col, *cols).select_from(receipts)
            if join is not None:
                q = q.join(*join)
            q = q.group_by(key_col).order_by(served.desc(), key_col)
            if limit is not None:
                q = q.limit(limit)
            out = []
            for k, n, t, vm, dm in conn.execute(q):
                key = bytes(k).hex() if isinstance(k, bytes | memoryview) else str(k)
                out.append(accounting.cost_line(key, int(n), int(t), int(vm), int(dm), p))
            return out

        with self._read() as conn:
            n, t, vm, dm = conn.execute(select(*cols).select_from(receipts)).one()
            overall = accounting.cost_line(
                "overall", int(n), int(t or 0), int(vm or 0), int(dm or 0), p
            )
            vp, np_ = aliased(peers), aliased(peers)
            by_v = lines(conn, vp.c.peer_id, (vp, vp.c.id == receipts.c.verifier_pk))
            by_n = lines(conn, np_.c.peer_id, (np_, np_.c.id == receipts.c.node_pk))
            by_s = lines(
                conn,
                sessions.c.session_id,
                (sessions, sessions.c.id == receipts.c.session_pk),
                sessions_limit,
            )
            base = []
            for mode, tok, ss, es in conn.execute(
                select(
                    baselines.c.mode,
                    func.sum(baselines.c.tokens),
                    func.sum(baselines.c.server_seconds),
                    func.sum(baselines.c.edge_seconds),
                )
                .group_by(baselines.c.mode)
                .order_by(baselines.c.mode)
            ):
                base.append(accounting.baseline_line(mode, int(tok), float(ss), float(es), p))
        return CostReport(p, overall, by_v, by_n, by_s, base)

    def served_over_time(self, since_ms: int, bucket_ms: int) -> list[tuple[int, int]]:
        """Served tokens (accepted + bonus per receipt) per time bucket since `since_ms`:
        (bucket start unix ms, tokens), oldest first, empty buckets left out. One grouped
        query, so a monitor can plot the network's throughput from a large ledger."""
        if bucket_ms <= 0:
            raise ValueError("bucket_ms must be > 0")
        bucket = receipts.c.unix_ms // bucket_ms
        served = func.count() + func.sum(receipts.c.accepted)
        q = (
            select(bucket, served)
            .where(receipts.c.unix_ms >= since_ms)
            .group_by(bucket)
            .order_by(bucket)
        )
        with self._read() as conn:
            return [(int(b) * bucket_ms, int(t)) for b, t in conn.execute(q)]

    # ------------------------------------------------------------------ export

    def peer_stats(self, now_ms: int | None = None) -> list[PeerStats]:
        """Per-peer statistics (the `export` command), sorted by total credit."""
        now_ms = _now_ms() if now_ms is None else now_ms
        stats: dict[str, dict[str, object]] = {}

        def s(peer: str) -> dict[str, object]:
            return stats.setdefault(
                peer,
                {
                    "total_credit": 0,
                    "draft_credit": 0,
                    "verify_credit": 0,
                    "expavg": 0.0,
                    "rn": 0,
                    "rv": 0,
                    "drafted": 0,
                    "accepted": 0,
                    "verified": 0,
                    "dm": 0,
                    "vm": 0,
                    "sn": 0,
                    "sv": 0,
                    "first": None,
                    "last": None,
                },
            )

        day = receipts.c.unix_ms // _DAY_MS
        decay = math.log(2) / EXPAVG_HALF_LIFE_DAYS
        with self._read() as conn:
            for b in self.balances():
                if b.account == accounting.NETWORK_ACCOUNT:
                    continue
                d = s(b.account)
                d.update(
                    total_credit=b.balance,
                    draft_credit=b.draft_credit,
                    verify_credit=b.verify_credit,
                )
            for role, pk_col in (("n", receipts.c.node_pk), ("v", receipts.c.verifier_pk)):
                q = (
                    select(
                        peers.c.peer_id,
                        func.count(),
                        func.sum(receipts.c.drafted),
                        func.sum(receipts.c.accepted),
                        func.sum(receipts.c.draft_micros),
                        func.sum(receipts.c.verify_micros),
                        func.count(func.distinct(receipts.c.session_pk)),
                        func.min(receipts.c.unix_ms),
                        func.max(receipts.c.unix_ms),
                    )
                    .join(peers, peers.c.id == pk_col)
                    .group_by(peers.c.peer_id)
                )
                for p, n, dr, ac, dm, vm, ns, lo, hi in conn.execute(q):
                    d = s(p)
                    d["r" + role] = int(n)
                    d["s" + role] = int(ns)
                    if role == "n":
                        d.update(drafted=int(dr), accepted=int(ac), dm=int(dm))
                    else:
                        d.update(verified=int(dr), vm=int(vm))
                    d["first"] = lo if d["first"] is None else min(d["first"], lo)  # type: ignore[type-var]
                    d["last"] = hi if d["last"] is None else max(d["last"], hi)  # type: ignore[type-var]
                # Credit per day bucket, decayed to now: BOINC's "recent average credit".
                credit = receipts.c.accepted if role == "n" else receipts.c.drafted
                q = (
                    select(peers.c.peer_id, day, func.sum(credit))
                    .join(peers, peers.c.id == pk_col)
                    .group_by(peers.c.peer_id, day)
                )
                for p, dd, c in conn.execute(q):
                    age_days = max(0.0, (now_ms - (int(dd) + 0.5) * _DAY_MS) / _DAY_MS)
                    s(p)["expavg"] += int(c) * decay * math.exp(-decay * age_days)  # type: ignore[operator]
        out = []
        for p, d in stats.items():
            drafted, accepted = int(d["drafted"]), int(d["accepted"])  # type: ignore[call-overload]
            out.append(
                PeerStats(
                    peer_id=p,
                    total_credit=int(d["total_credit"]),  # type: ignore[call-overload]
                    expavg_credit=round(float(d["expavg"]), 6),  # type: ignore[arg-type]
                    draft_credit=int(d["draft_credit"]),  # type: ignore[call-overload]
                    verify_credit=int(d["verify_credit"]),  # type: ignore[call-overload]
                    receipts_as_node=int(d["rn"]),  # type: ignore[call-overload]
                    receipts_as_verifier=int(d["rv"]),  # type: ignore[call-overload]
                    drafted=drafted,
                    accepted=accepted,
                    acceptance_rate=accepted / drafted if drafted else None,
                    tokens_verified=int(d["verified"]),  # type: ignore[call-overload]
                    draft_seconds=int(d["dm"]) / 1e6,  # type: ignore[call-overload]
                    verify_seconds=int(d["vm"]) / 1e6,  # type: ignore[call-overload]
                    sessions_as_node=int(d["sn"]),  # type: ignore[call-overload]
                    sessions_as_verifier=int(d["sv"]),  # type: ignore[call-overload]
                    first_unix_ms=d["first"],  # type: ignore[arg-type]
                    last_unix_ms=d["last"],  # type: ignore[arg-type]
                )
            )
        out.sort(key=lambda x: (-x.total_credit, x.peer_id))
        return out

    # ------------------------------------------------------------------ verify

    def verify(self, anchor: Iterable[ChainHeadInfo] | None = None, jobs: int = 1):  # type: ignore[no-untyped-def]
        """Re-check every signature, the chains and the credit; see `verify.verify_ledger`."""
        from specedge.ledger.verify import verify_ledger

        return verify_ledger(self.engine, anchor=anchor, jobs=jobs)

    # ------------------------------------------------------------------ audits

    def store_proof(self, data: bytes):  # type: ignore[no-untyped-def]
        """Check and keep a fraud proof; see `frauds.store_proof`."""
        from specedge.ledger.frauds import store_proof

        return store_proof(self.engine, data)

    def record_audit(self, verifier: str, auditor: str, session_id: bytes, tokens: int,
                     near_ties: int) -> None:
        """Note a clean audit of a verifier's session; see `frauds.record_audit`."""
        from specedge.ledger.frauds import record_audit

        record_audit(self.engine, verifier, auditor, session_id, tokens, near_ties)

    def iter_receipt_pairs(self, batch: int = 1000) -> Iterator[tuple[bytes, bytes]]:
        """Every stored (receipt envelope, request envelope), in chain order (for re-export)."""
        q = select(receipts.c.receipt_envelope, receipts.c.request_envelope).order_by(
            receipts.c.verifier_pk, receipts.c.chain_index
        )
        with self._read() as conn:
            for r in conn.execution_options(yield_per=batch).execute(q):
                yield bytes(r[0]), bytes(r[1])


def open_ledger(
    url: str | os.PathLike[str] | None = None, *, migrate: bool = True, name: str = "ledger"
) -> Ledger:
    """Open (and by default create or upgrade) a ledger.

    url: None for $SPECEDGE_LEDGER or else `<user data dir>/specedge/<name>.sqlite3`; a
    file path or `sqlite:///...` for SQLite; `postgresql+psycopg://user@host/db` for a
    shared fleet ledger (add `?options=-csearch_path%3Dmyschema` to use a schema).
    Raises LedgerUnavailable when the database cannot be reached.
    """
    engine = db.make_engine(db.resolve_url(url, name))
    if migrate:
        try:
            db.migrate(engine)
        except sa_exc.DBAPIError as exc:
            engine.dispose()
            if _is_unavailable(exc):
                raise LedgerUnavailable(str(exc.orig or exc)) from exc
            raise
    return Ledger(engine)


__all__ = [
    "Balance",
    "ChainHeadInfo",
    "CostReport",
    "IngestResult",
    "Ledger",
    "LedgerUnavailable",
    "PeerStats",
    "ReceiptInfo",
    "open_ledger",
]
