"""The ledger's side of the page: who earned what, what a token cost, throughput over time.

Everything comes from the ledger's own accounting (``Ledger.peer_stats``, ``Ledger.cost``,
``Ledger.served_over_time``), so the page says what ``specedge-ledger top`` and ``cost``
say. The monitor only reads: it never migrates or writes the database. SQLAlchemy
blocks, so ``read_board`` runs in a worker thread.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy.engine import make_url

from specedge.ledger import Ledger, open_ledger
from specedge.ledger.db import resolve_url

TOP = 10  # rows per leaderboard
WINDOW_MS = 3_600_000  # the throughput plot's span
BUCKET_MS = 60_000  # one plot point per minute


def open_readonly(url: str) -> Ledger:
    """The ledger at ``url``, unmigrated. A SQLite file that does not exist is an error
    (ValueError), not a new empty ledger: a typo must not look like an idle network."""
    resolved = resolve_url(url)
    parsed = make_url(resolved)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not path.is_file():
            raise ValueError(f"no ledger file at {path}")
    return open_ledger(resolved, migrate=False)


def read_board(ledger: Ledger, now_ms: int | None = None, top: int = TOP) -> dict[str, object]:
    """The leaderboard document of ``/api/state`` (``ledger`` key)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    stats = ledger.peer_stats(now_ms)
    cost = ledger.cost(sessions_limit=0)
    per_verifier = {c.key: c.usd_per_mtok for c in cost.by_verifier}
    nodes = sorted((s for s in stats if s.receipts_as_node),
                   key=lambda s: (-s.accepted, s.peer_id))[:top]
    verifiers = sorted((s for s in stats if s.receipts_as_verifier),
                       key=lambda s: (-s.tokens_verified, s.peer_id))[:top]
    return {
        "read_unix": now_ms / 1000.0,
        "error": None,
        "receipts": cost.overall.receipts,
        "nodes": [{"peer_id": s.peer_id, "accepted": s.accepted, "drafted": s.drafted,
                   "acceptance": s.acceptance_rate, "credit": s.total_credit,
                   "sessions": s.sessions_as_node} for s in nodes],
        "verifiers": [{"peer_id": s.peer_id, "tokens_verified": s.tokens_verified,
                       "credit": s.total_credit, "receipts": s.receipts_as_verifier,
                       "verify_s": s.verify_seconds,
                       "usd_per_mtok": per_verifier.get(s.peer_id)} for s in verifiers],
        "cost": cost_summary(cost),
        "throughput": throughput(ledger, now_ms),
        "window_s": WINDOW_MS / 1000.0,
        "bucket_s": BUCKET_MS / 1000.0,
    }


def cost_summary(cost) -> dict[str, object]:  # noqa: ANN001 (ledger.core.CostReport)
    """$ per 1M served tokens, against the server-only baseline when one is recorded
    (`specedge-ledger baseline server-only ...`): the efficiency is baseline / network,
    as `specedge-ledger cost` computes it."""
    base = {b.key: b.usd_per_mtok for b in cost.baselines}
    ours, server_only = cost.overall.usd_per_mtok, base.get("server_only")
    p = cost.prices
    return {
        "tokens": cost.overall.tokens,
        "usd_per_mtok": ours,
        "server_only_usd_per_mtok": server_only,
        "autoregressive_usd_per_mtok": base.get("autoregressive"),
        "efficiency_vs_server_only": server_only / ours if ours and server_only else None,
        "prices": {"server_usd_per_hour": p.server_usd_per_hour,
                   "server_hardware": p.server_hardware,
                   "edge_usd_per_hour": p.edge_usd_per_hour, "edge_hardware": p.edge_hardware},
    }


def throughput(ledger: Ledger, now_ms: int) -> list[dict[str, float]]:
    """Served tokens/s per minute over the last hour, empty minutes as zeros (the
    current minute divided by the part of it that has passed)."""
    first = (now_ms - WINDOW_MS) // BUCKET_MS * BUCKET_MS
    got = dict(ledger.served_over_time(first, BUCKET_MS))
    out = []
    for t in range(first, now_ms + 1, BUCKET_MS):
        span_s = min(BUCKET_MS, max(1000, now_ms - t)) / 1000.0
        out.append({"t": t / 1000.0, "tokens_per_s": got.get(t, 0) / span_s})
    return out
