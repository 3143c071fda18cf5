"""`verify`: re-check a whole ledger from its signed bytes.

What is checked, in one consistent snapshot (REPEATABLE READ on PostgreSQL, one read
transaction on SQLite):

1. Every receipt row, in chain order per verifier: both signatures and every
   cross-check of ingest (`checks.check_pair`); every stored column against the signed
   value; its peers and session rows against the signed peer ids, keys, session id and
   model; chain_index contiguous from 0; prev_hash = previous row_hash (genesis first);
   row_hash recomputed; no (verifier, session, seq) twice.
2. chain_heads: one per chain, length and head hash equal to the chain's last row.
   This is what catches a deleted last row.
3. No peer or session row that no receipt references (forged rows).
4. Credit: each receipt's legs are exactly `accounting.credit_legs` of its (checked)
   receipt, and no leg belongs to no receipt.

Limit, inherent to any hash chain: someone with write access who drops the newest rows
of a chain *and* rewrites that chain's head row is only caught against a head recorded
earlier, elsewhere: save `specedge-ledger heads --json` and pass it as `--anchor`.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

from sqlalchemy import Connection, Engine, select

from specedge.ledger import accounting, chain
from specedge.ledger.checks import CheckedReceipt, ReceiptRejected, check_pair
from specedge.ledger.schema import chain_heads, credit_entries, peers, receipts, sessions

MAX_PROBLEMS = 1000
_CHUNK = 512

_ROW_COLUMNS = (
    receipts.c.id,
    receipts.c.verifier_pk,
    receipts.c.node_pk,
    receipts.c.session_pk,
    receipts.c.seq,
    receipts.c.request_sha256,
    receipts.c.drafted,
    receipts.c.accepted,
    receipts.c.verify_micros,
    receipts.c.draft_micros,
    receipts.c.unix_ms,
    receipts.c.model_id,
    receipts.c.receipt_envelope,
    receipts.c.request_envelope,
    receipts.c.chain_index,
    receipts.c.ingested_ms,
    receipts.c.prev_hash,
    receipts.c.row_hash,
)
# Stored receipt columns that are plain copies of a signed receipt field.
_COPIED = (
    "seq",
    "request_sha256",
    "drafted",
    "accepted",
    "verify_micros",
    "draft_micros",
    "unix_ms",
    "model_id",
)


@dataclass(frozen=True)
class Problem:
    table: str
    row_id: object
    message: str

    def __str__(self) -> str:
        return f"{self.table} row {self.row_id}: {self.message}"


@dataclass
class VerifyReport:
    ok: bool = True
    receipts: int = 0
    chains: int = 0
    credit_entries: int = 0
    peers: int = 0
    sessions: int = 0
    proofs: int = 0  # fraud proofs re-checked
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    problems_total: int = 0

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def add(self, table: str, row_id: object, message: str) -> None:
        self.ok = False
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(table, row_id, message))

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["first_bad"] = asdict(self.first) if self.first else None
        return d


# ---------------------------------------------------------------- signature checks


def _check_one(
    receipt_env: bytes, request_env: bytes, prev_hash: bytes, chain_index: int, ingested_ms: int
) -> tuple[CheckedReceipt | ReceiptRejected, bytes]:
    """(the pair's check result without its envelopes, the recomputed row_hash)."""
    digest = hashlib.sha256(request_env).digest()
    row_hash = chain.link_hash(prev_hash, chain_index, ingested_ms, receipt_env, digest)
    try:
        c = check_pair(receipt_env, request_env)
    except ReceiptRejected as exc:
        return exc, row_hash
    # The caller has the envelopes; sending them back from a worker would double the IPC.
    return replace(c, receipt_envelope=b"", request_envelope=b""), row_hash


def _check_chunk(items: Sequence[tuple[bytes, bytes, bytes, int, int]]) -> list:  # type: ignore[type-arg]
    return [_check_one(*item) for item in items]


def _work_item(r: Sequence) -> tuple[bytes, bytes, bytes, int, int]:  # type: ignore[type-arg]
    return (
        bytes(r.receipt_envelope),  # type: ignore[attr-defined]
        bytes(r.request_envelope),  # type: ignore[attr-defined]
        bytes(r.prev_hash),  # type: ignore[attr-defined]
        r.chain_index,  # type: ignore[attr-defined]
        r.ingested_ms,  # type: ignore[attr-defined]
    )


def _checked_rows(rows: Iterator[Sequence], jobs: int) -> Iterator[tuple[Sequence, tuple]]:  # type: ignore[type-arg]
    """Yield (row, (check result, recomputed row_hash)) in row order.

    With jobs > 1 the signature checks and hashing (nearly all of the time) run in
    worker processes, fed in chunks with bounded read-ahead so memory stays flat.
    """
    if jobs <= 1:
        for r in rows:
            yield r, _check_one(*_work_item(r))
        return
    import multiprocessing

    # forkserver: never fork this process (it holds threads and database connections),
    # and the preloaded server makes each worker start without re-importing libp2p.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["specedge.ledger.verify"])
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        pending: deque[tuple[list[Sequence], Future]] = deque()  # type: ignore[type-arg]
        chunk: list[Sequence] = []  # type: ignore[type-arg]
        for r in rows:
            chunk.append(r)
            if len(chunk) == _CHUNK:
                pending.append((chunk, pool.submit(_check_chunk, [_work_item(x) for x in chunk])))
                chunk = []
                while len(pending) > 4 * jobs:
                    done_rows, fut = pending.popleft()
                    yield from zip(done_rows, fut.result(), strict=True)
        if chunk:
            pending.append((chunk, pool.submit(_check_chunk, [_work_item(x) for x in chunk])))
        while pending:
            done_rows, fut = pending.popleft()
            yield from zip(done_rows, fut.result(), strict=True)


# ---------------------------------------------------------------- the checks


def verify_ledger(
    engine: Engine, anchor: Iterable[object] | None = None, jobs: int = 1
) -> VerifyReport:
    """Check the whole ledger; `report.ok` is True only when everything is intact.

    anchor: chain heads saved earlier (objects or dicts with verifier, length,
    head_hash hex); each chain must still contain that row with that hash.
    jobs: processes for the signature checks (the bulk of the time).
    """
    t0 = time.perf_counter()
    report = VerifyReport()
    anchors: dict[str, tuple[int, str]] = {}
    for a in anchor or ():
        d = a if isinstance(a, dict) else asdict(a)  # type: ignore[call-overload]
        if int(d["length"]) > 0:  # an empty chain anchors nothing
            anchors[str(d["verifier"])] = (int(d["length"]), str(d["head_hash"]))
    conn = engine.connect()
    try:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            _verify(conn, report, anchors, jobs)
    finally:
        conn.close()
    _verify_proofs(engine, report)
    report.seconds = time.perf_counter() - t0
    return report


def _verify_proofs(engine: Engine, report: VerifyReport) -> None:
    """Every stored fraud proof must still prove what its row says (signatures, the
    transcript, two auditors beyond the tolerance)."""
    from specedge.ledger.frauds import list_proofs, verify_proofs

    report.proofs = len(list_proofs(engine))
    for row_id, message in verify_proofs(engine):
        report.add("fraud_proofs", row_id, message)


def _verify(
    conn: Connection, report: VerifyReport, anchors: dict[str, tuple[int, str]], jobs: int
) -> None:
    peer_rows = {r.id: (r.peer_id, bytes(r.public_key)) for r in conn.execute(select(peers))}
    sess_rows = {
        r.id: (r.verifier_pk, r.node_pk, bytes(r.session_id), r.model_id)
        for r in conn.execute(select(sessions))
    }
    head_rows = {
        r.verifier_pk: (r.length, bytes(r.head_hash)) for r in conn.execute(select(chain_heads))
    }
    report.peers, report.sessions = len(peer_rows), len(sess_rows)

    used_peers: set[int] = set()
    used_sessions: set[int] = set()
    seen_keys: set[tuple[int, bytes, int]] = set()
    chain_ends: dict[int, tuple[int, bytes]] = {}  # verifier pk -> (rows, last row_hash)
    anchor_hits: dict[str, bool] = {}

    rows = conn.execution_options(yield_per=2000).execute(
        select(*_ROW_COLUMNS).order_by(receipts.c.verifier_pk, receipts.c.chain_index)
    )
    cur_v: int | None = None
    count = 0
    expect_index = 0
    prev = b""
    for r, (checked, row_hash) in _checked_rows(iter(rows), jobs):
        report.receipts += 1
        if r.verifier_pk != cur_v:
            if cur_v is not None:
                chain_ends[cur_v] = (count, prev)
            cur_v, count, expect_index = r.verifier_pk, 0, 0
            vpeer = peer_rows.get(cur_v)
            prev = chain.genesis_hash(vpeer[0]) if vpeer else b""
        count += 1
        used_peers.update((r.verifier_pk, r.node_pk))
        used_sessions.add(r.session_pk)
        faults: list[str] = []

        # The chain link.
        if r.chain_index != expect_index:
            faults.append(
                f"chain index {r.chain_index} where {expect_index} was due "
                "(a row was removed or inserted)"
            )
        if bytes(r.prev_hash) != prev:
            faults.append("prev_hash is not the previous row's hash")
        if row_hash != bytes(r.row_hash):
            faults.append("row_hash does not match the row")

        # The signatures and the stored copies of signed fields.
        vpeer, npeer = peer_rows.get(r.verifier_pk), peer_rows.get(r.node_pk)
        if isinstance(checked, ReceiptRejected):
            faults.append(f"signed envelopes fail: {checked}")
        else:
            c: CheckedReceipt = checked  # type: ignore[assignment]
            for name in _COPIED:
                stored = getattr(r, name)
                stored = bytes(stored) if isinstance(stored, bytes | memoryview) else stored
                if stored != getattr(c, name):
                    faults.append(f"{name} {stored!r} differs from the signed {getattr(c, name)!r}")
            if vpeer != (c.verifier, c.verifier_key):
                faults.append(f"verifier peer row {r.verifier_pk} is not the receipt's signer")
            if npeer != (c.node, c.node_key):
                faults.append(f"node peer row {r.node_pk} is not the request's signer")
            srow = sess_rows.get(r.session_pk)
            if srow != (r.verifier_pk, r.node_pk, c.session_id, c.model_id):
                faults.append(f"session row {r.session_pk} does not match the signed receipt")
            key = (r.verifier_pk, c.session_id, c.seq)
            if key in seen_keys:
                faults.append("a second receipt for the same (verifier, session, seq)")
            seen_keys.add(key)
        if vpeer is not None and vpeer[0] in anchors:
            a_len, a_hash = anchors[vpeer[0]]
            if r.chain_index == a_len - 1:
                anchor_hits[vpeer[0]] = bytes(r.row_hash).hex() == a_hash
        if faults:
            who = vpeer[0] if vpeer else r.verifier_pk
            where = f"{r.id} (verifier {who}, chain index {r.chain_index})"
            report.add("receipts", where, "; ".join(faults))
        # Follow the stored link so one bad row is reported once, not once per later row.
        expect_index = r.chain_index + 1
        prev = bytes(r.row_hash)
    if cur_v is not None:
        chain_ends[cur_v] = (count, prev)
    report.chains = len(chain_ends)

    # Heads: a dropped newest row leaves the head pointing past the chain's end.
    for vpk, (n, last) in chain_ends.items():
        head = head_rows.get(vpk)
        if head is None:
            report.add("chain_heads", vpk, "chain has no head row")
        elif head != (n, last):
            report.add(
                "chain_heads",
                vpk,
                f"head says {head[0]} rows ending {head[1].hex()[:16]}, chain has {n} ending "
                f"{last.hex()[:16]} (rows removed or added at the end)",
            )
    for vpk in sorted(set(head_rows) - set(chain_ends)):
        report.add("chain_heads", vpk, "head row for a verifier with no receipts")
    for peer_id, (a_len, _) in sorted(anchors.items()):
        if not anchor_hits.get(peer_id, False):
            report.add(
                "receipts",
                f"(verifier {peer_id}, chain index {a_len - 1})",
                "the anchored chain row is missing or its hash changed",
            )

    for pk in sorted(set(peer_rows) - used_peers):
        report.add("peers", pk, f"peer {peer_rows[pk][0]} appears in no receipt (forged row)")
    for pk in sorted(set(sess_rows) - used_sessions):
        report.add("sessions", pk, "session appears in no receipt (forged row)")

    _verify_credit(conn, report, peer_rows)


def _verify_credit(conn: Connection, report: VerifyReport, peer_rows: dict) -> None:  # type: ignore[type-arg]
    """Merge receipts (by id) with credit legs (by receipt id): both streams are sorted."""
    rec = conn.execution_options(yield_per=5000).execute(
        select(
            receipts.c.id,
            receipts.c.verifier_pk,
            receipts.c.node_pk,
            receipts.c.drafted,
            receipts.c.accepted,
        ).order_by(receipts.c.id)
    )
    legs = conn.execution_options(yield_per=5000).execute(
        select(
            credit_entries.c.id,
            credit_entries.c.receipt_pk,
            credit_entries.c.account,
            credit_entries.c.kind,
            credit_entries.c.amount,
        ).order_by(credit_entries.c.receipt_pk, credit_entries.c.id)
    )
    leg_iter = iter(legs)
    pending = next(leg_iter, None)
    for r in rec:
        # Legs of receipt ids that do not exist (below this one) are forged.
        while pending is not None and pending.receipt_pk < r.id:
            report.credit_entries += 1
            report.add(
                "credit_entries", pending.id, f"belongs to no receipt ({pending.receipt_pk})"
            )
            pending = next(leg_iter, None)
        got: list[tuple[str, str, int]] = []
        ids: list[int] = []
        while pending is not None and pending.receipt_pk == r.id:
            report.credit_entries += 1
            got.append((pending.account, pending.kind, pending.amount))
            ids.append(pending.id)
            pending = next(leg_iter, None)
        node = peer_rows.get(r.node_pk, ("?",))[0]
        verifier = peer_rows.get(r.verifier_pk, ("?",))[0]
        want = accounting.credit_legs(node, verifier, r.drafted, r.accepted)
        if sorted(got) != sorted(want):
            report.add(
                "credit_entries",
                ids or f"(none for receipt {r.id})",
                f"legs of receipt {r.id} are {sorted(got)}, the receipt gives {sorted(want)}",
            )
    while pending is not None:
        report.credit_entries += 1
        report.add("credit_entries", pending.id, f"belongs to no receipt ({pending.receipt_pk})")
        pending = next(leg_iter, None)
