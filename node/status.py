"""The live status of `specedge-node join`: which verifiers, how well drafting goes, how
much credit the receipts prove.

Rendering is a pure function of the edge's state (testable without a terminal); `show`
redraws it from a trio task. Rich's own refresh thread is not used: every read of the
state happens on the event loop that writes it. Without a terminal (a service, a test)
a one-line summary is logged now and then instead.
"""

from __future__ import annotations

import logging
import time

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from specedge.node.discovery import VerifierPool
from specedge.node.edge import Edge
from specedge.node.receipts import ReceiptBook

log = logging.getLogger("specedge.node.status")

REDRAW_INTERVAL = 0.5
LOG_INTERVAL = 30.0


def _short(peer: str) -> str:
    return peer if len(peer) <= 16 else f"{peer[:6]}…{peer[-6:]}"


def summary(edge: Edge, pool: VerifierPool | None, book: ReceiptBook | None) -> str:
    """One line: what the log says when there is no terminal."""
    a = edge.activity
    using = ",".join(_short(p) for p in (pool.in_use if pool else {})) or "-"
    credit = book.tally.credit if book is not None else 0
    return (f"requests {a.active} active / {a.completed} done, {a.tokens} tokens, "
            f"{a.tokens_per_s():.1f} tok/s, acceptance {a.acceptance:.0%}, "
            f"proactive {a.proactive_hits}/{a.proactive_bets}, failovers {a.failovers}, "
            f"verifiers in use {using}, credit {credit}"
            + (f", audits: {audit_line(pool.auditor)}" if getattr(pool, "auditor", None) else ""))


def audit_line(auditor: object) -> str:
    """Audits done, the current rates, disagreements, excused near-ties, frauds."""
    s = auditor.stats  # type: ignore[attr-defined]
    rates = [auditor.policy.rate(v) for v in auditor.policy.clean]  # type: ignore[attr-defined]
    rate = (f"rate {min(rates):.0%}-{max(rates):.0%}" if rates else "rate 100% (no verifier "
            "audited yet)") if auditor.policy.fixed is None else (  # type: ignore[attr-defined]
            f"rate fixed {auditor.policy.fixed:.0%}")  # type: ignore[attr-defined]
    mode = ", sync" if auditor.sync else ""  # type: ignore[attr-defined]
    banned = auditor.banned  # type: ignore[attr-defined]
    return (f"{s.sessions_audited} sessions ({rate}{mode}), {s.disagreements} disagreements, "
            f"{s.near_ties} near-ties excused, {s.lying_auditors} lying auditors, "
            f"{s.frauds} frauds" + (f"; banned {', '.join(_short(b) for b in banned)}"
                                    if banned else ""))


def relay_path(pool: VerifierPool, cand: object) -> str | None:
    """How the node reaches a verifier now: direct, or relayed (it is behind NAT)."""
    from specedge.protocol.relay import connection_path

    try:
        return connection_path(pool.host, cand.info.peer_id)
    except Exception:  # a pool without a live host (a test's fake, a stopped node)
        return None


def render(edge: Edge, pool: VerifierPool | None, book: ReceiptBook | None, *,
           node: str = "", api: str = "") -> Group:
    """The status screen: a header, the verifiers table and the work/credit table."""
    a = edge.activity
    m = edge.models
    head = Text.assemble(("SpecEdge node ", "bold"), (_short(node), "cyan"),
                         f"  target {m.target_name}  draft {m.draft_name}",
                         f"  up {int(time.monotonic() - a.started)} s")
    if api:
        head.append(f"\nAPI {api}/v1", style="green")

    vt = Table(title="verifiers", expand=True, title_justify="left")
    for col in ("peer", "from", "path", "state", "free slots", "queue", "round trip", "verify",
                "my standing"):
        vt.add_column(col)
    if pool is not None:
        for i, c in enumerate(pool.ranked):
            busy = pool.in_use.get(c.peer, 0)
            state = f"in use ({busy})" if busy else ("spare" if i < 2 else "known")
            path = relay_path(pool, c) or c.path or "-"
            vt.add_row(_short(c.peer), c.source, path, state, str(c.advert.free_slots),
                       str(c.advert.queue_depth), f"{c.rtt_s * 1e3:.1f} ms",
                       f"{c.advert.mean_verify_micros / 1e3:.1f} ms",
                       f"{c.advert.your_standing:.0f}" if c.advert.your_standing else "-")
        for peer, why in pool.dead.items():
            vt.add_row(_short(peer), "", "", Text("dead", style="red"), "", "", "", why[:40], "")
        if not pool.ranked and not pool.dead:
            vt.add_row("(none found yet)", "", "", "", "", "", "", "", "")

    wt = Table(title="work", expand=True, title_justify="left", show_header=False)
    wt.add_column("what")
    wt.add_column("value")
    wt.add_row("requests", f"{a.active} active, {a.completed} done, {a.failed} failed")
    wt.add_row("tokens", f"{a.tokens} ({a.tokens_per_s():.1f} tok/s over 10 s)")
    wt.add_row("acceptance", f"{a.acceptance:.1%} of {a.drafted} drafted, "
               f"{a.rounds} rounds")
    bets = f"{a.proactive_hits}/{a.proactive_bets}" if a.proactive_bets else "-"
    wt.add_row("proactive hits", bets if edge.proactive else "off")
    wt.add_row("failovers", str(a.failovers) + (f"  ({a.last_event})" if a.last_event else ""))
    auditor = getattr(pool, "auditor", None)
    if auditor is not None:
        wt.add_row("audits", audit_line(auditor))
    if book is not None:
        t = book.tally
        stored = f"{t.stored} stored" + (f", {t.failed} NOT stored: {t.last_error}"
                                         if t.failed else "")
        wt.add_row("receipts", f"{t.receipts} this run ({stored})")
        wt.add_row("credit", f"{t.credit} accepted draft tokens (ledger balance)")
    return Group(head, vt, wt)


async def show(edge: Edge, pool: VerifierPool | None, book: ReceiptBook | None, *,
               node: str = "", api: str = "", console: Console | None = None) -> None:
    """Redraw the status until cancelled (a rich Live on a terminal, log lines otherwise)."""
    console = console or Console()
    if not console.is_terminal:
        last = ""
        while True:
            line = summary(edge, pool, book)
            if line != last:
                log.info("%s", line)
                last = line
            await trio.sleep(LOG_INTERVAL)
    with Live(render(edge, pool, book, node=node, api=api), console=console,
              auto_refresh=False, transient=False) as live:
        while True:
            await trio.sleep(REDRAW_INTERVAL)
            live.update(render(edge, pool, book, node=node, api=api), refresh=True)
