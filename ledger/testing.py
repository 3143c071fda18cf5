"""Real signed receipts for tests and benchmarks (no network, no model).

Each pair is what a node and a verifier really exchange: the node seals a
VerifyRequest with its key, the verifier seals a Receipt naming that envelope's digest.
Also home of the worker function the multi-process tests and the benchmark start.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from libp2p.crypto.keys import KeyPair

from specedge.protocol import specedge_pb2 as pb
from specedge.protocol.envelopes import request_digest, seal_receipt, seal_request
from specedge.protocol.identity import load_or_create_identity, peer_id_of


class Peer:
    """A key pair and its peer id, loaded from (or created in) an identity file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.key_pair: KeyPair = load_or_create_identity(Path(path))
        self.peer_id: str = peer_id_of(self.key_pair)


def make_peers(directory: str | os.PathLike[str], n: int, prefix: str = "peer") -> list[Peer]:
    return [Peer(Path(directory) / f"{prefix}{i}.key") for i in range(n)]


def make_pair(
    verifier: Peer,
    node: Peer,
    session_id: bytes,
    seq: int,
    *,
    drafted: int = 8,
    accepted: int = 5,
    verify_micros: int = 12_000,
    draft_micros: int = 30_000,
    unix_ms: int | None = None,
    model_id: str = "tiny-test",
    rng: random.Random | None = None,
    receipt_overrides: dict[str, object] | None = None,
) -> tuple[bytes, bytes]:
    """(receipt envelope, request envelope) for one verified chain of `drafted` tokens.

    receipt_overrides: Receipt fields to set after the honest ones (to forge bad pairs).
    """
    rng = rng or random
    request = pb.VerifyRequest(
        session_id=session_id,
        seq=seq,
        tokens=[rng.randrange(32_000) for _ in range(drafted)],
        parents=list(range(-1, drafted - 1)),
        proactive=False,
        draft_micros=draft_micros,
    )
    request_env = seal_request(node.key_pair, request)
    receipt = pb.Receipt(
        verifier_peer_id=verifier.peer_id,
        node_peer_id=node.peer_id,
        session_id=session_id,
        seq=seq,
        request_sha256=request_digest(request_env),
        drafted=drafted,
        accepted=accepted,
        verify_micros=verify_micros,
        unix_ms=int(time.time() * 1000) if unix_ms is None else unix_ms,
        model_id=model_id,
        draft_micros=draft_micros,
    )
    for name, value in (receipt_overrides or {}).items():
        setattr(receipt, name, value)
    return seal_receipt(verifier.key_pair, receipt), request_env


def make_workload(
    verifiers: Sequence[Peer],
    nodes: Sequence[Peer],
    n: int,
    *,
    seed: int = 0,
    rounds_per_session: int = 20,
) -> list[tuple[bytes, bytes]]:
    """n receipts over sessions of `rounds_per_session` rounds, random verifier and node."""
    rng = random.Random(seed)
    out: list[tuple[bytes, bytes]] = []
    base_ms = 1_763_000_000_000
    while len(out) < n:
        v, nd = rng.choice(verifiers), rng.choice(nodes)
        sid = rng.randbytes(16)
        for seq in range(1, rounds_per_session + 1):
            if len(out) == n:
                break
            drafted = rng.randint(1, 16)
            out.append(
                make_pair(
                    v,
                    nd,
                    sid,
                    seq,
                    drafted=drafted,
                    accepted=rng.randint(0, drafted),
                    verify_micros=rng.randint(2_000, 40_000),
                    draft_micros=rng.randint(5_000, 80_000),
                    unix_ms=base_ms + len(out) * 37,
                    rng=rng,
                )
            )
    return out


def ingest_worker(
    url: str, pairs: Sequence[tuple[bytes, bytes]], barrier: object | None = None, batch: int = 1
) -> dict[str, int]:
    """Run in a child process: open the ledger, wait at the barrier, ingest everything.

    Returns counts per status (and the wall time in ms), so tests can add them up.
    """
    from specedge.ledger import open_ledger

    ledger = open_ledger(url)
    try:
        if barrier is not None:
            barrier.wait()  # type: ignore[attr-defined]
        counts: dict[str, int] = {}
        t0 = time.perf_counter()
        if batch <= 1:
            for receipt_env, request_env in pairs:
                status = ledger.ingest(receipt_env, request_env).status
                counts[status] = counts.get(status, 0) + 1
        else:
            for i in range(0, len(pairs), batch):
                for res in ledger.ingest_many(pairs[i : i + batch]):
                    counts[res.status] = counts.get(res.status, 0) + 1
        counts["ms"] = int((time.perf_counter() - t0) * 1000)
        return counts
    finally:
        ledger.close()


def ingest_worker_to_queue(
    url: str, pairs: Sequence[tuple[bytes, bytes]], barrier: object, batch: int, queue: object
) -> None:
    """Process target: `ingest_worker`, with its counts put on `queue`."""
    queue.put(ingest_worker(url, pairs, barrier, batch))  # type: ignore[attr-defined]


def writer_processes(
    url: str,
    works: Sequence[Sequence[tuple[bytes, bytes]]],
    batches: Sequence[int],
    timeout: float = 120.0,
) -> list[dict[str, int]]:
    """Run one writer process per work list, all starting at once; their status counts.

    forkserver with the ledger preloaded: children start in well under a second instead
    of re-importing libp2p each (spawn), and without forking a threaded parent (fork).
    """
    import multiprocessing
    import queue as queue_mod

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["specedge.ledger", "specedge.ledger.testing"])
    barrier, results = ctx.Barrier(len(works)), ctx.Queue()
    procs = [
        ctx.Process(target=ingest_worker_to_queue, args=(url, w, barrier, b, results))
        for w, b in zip(works, batches, strict=True)
    ]
    for p in procs:
        p.start()
    out: list[dict[str, int]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < len(procs):
            try:
                out.append(results.get(timeout=0.5))
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"writer processes failed (exit codes {dead})") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out


# ---------------------------------------------------------------- PostgreSQL for tests

PG_TEST_URL = os.environ.get(
    "SPECEDGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def pg_available(url: str = PG_TEST_URL) -> bool:
    """Whether the test PostgreSQL answers (within two seconds)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


@contextlib.contextmanager
def pg_schema(url: str = PG_TEST_URL, prefix: str = "ledger_test") -> Iterator[str]:
    """A fresh schema for one test (run), dropped afterwards; yields a ledger URL using it.

    Concurrent test runs on one database each get their own schema, so they never see
    each other's rows.
    """
    import sqlalchemy as sa

    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url, connect_args={"connect_timeout": 5})
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        scoped = sa.make_url(url).update_query_dict({"options": f"-csearch_path={name}"})
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        admin.dispose()
