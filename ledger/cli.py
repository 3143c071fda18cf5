"""`specedge-ledger`: look into, check and export a ledger.

    specedge-ledger [--ledger URL] [--json] COMMAND ...

Every command prints a rich table, or JSON with --json (before or after COMMAND).
Exit status: 0 fine; 1 `verify` found a bad row; 2 usage error; 3 database unreachable.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from specedge.ledger import accounting
from specedge.ledger.checks import LedgerError, ReceiptRejected
from specedge.ledger.core import Ledger, LedgerUnavailable, open_ledger

EXIT_BAD = 1
EXIT_UNAVAILABLE = 3

_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> int:
    """A time as unix ms: '2h'/'7d' ago, an ISO date or datetime (UTC unless it says),
    or a unix timestamp in seconds or milliseconds."""
    now = time.time() if now is None else now
    t = text.strip()
    m = _REL.match(t)
    if m:
        return int((now - float(m.group(1)) * _UNIT_S[m.group(2)]) * 1000)
    if re.fullmatch(r"\d+(\.\d+)?", t):
        v = float(t)
        return int(v if v >= 1e11 else v * 1000)  # 1e11 s is year 5138; ms before that
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use 2h, 7d, 2025-11-22, 2025-11-22T10:00, or unix time)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _ms_text(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short(peer: str, full: bool) -> str:
    return peer if full or len(peer) <= 20 else f"{peer[:8]}…{peer[-6:]}"


def _usd(x: float | None) -> str:
    # Per-round costs are fractions of a cent: keep three significant digits.
    if x is None:
        return ""
    return f"${x:,.2f}" if abs(x) >= 100 else f"${x:.3g}"


class Output:
    def __init__(self, as_json: bool, full_ids: bool) -> None:
        self.as_json = as_json
        self.full = full_ids
        self.console = Console()

    def json(self, data: object) -> None:
        sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")

    def table(self, table: Table) -> None:
        self.console.print(table)


def _json_default(o: object) -> object:
    if isinstance(o, bytes | memoryview):
        return bytes(o).hex()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------ commands


def cmd_balance(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    from specedge.ledger.frauds import credit_state

    rows = [ledger.balance(args.peer)] if args.peer else ledger.balances()
    total = sum(b.balance for b in ledger.balances())
    # Verification credit is pending until audited clean, forfeited on a proven fraud.
    states = {b.account: credit_state(ledger.engine, b.account) if b.verify_credit else ""
              for b in rows}
    if out.as_json:
        out.json({"balances": [{**asdict(b), "verify_credit_state": states[b.account]}
                               for b in rows], "sum_of_all_balances": total})
        return 0
    t = Table(title="Credit balances (token units)")
    for col in ("account", "balance", "draft credit", "verify credit", "entries", "verify state"):
        t.add_column(col, justify="left" if col in ("account", "verify state") else "right")
    for b in rows:
        t.add_row(
            _short(b.account, out.full),
            f"{b.balance:,}",
            f"{b.draft_credit:,}",
            f"{b.verify_credit:,}",
            f"{b.entries:,}",
            states[b.account],
        )
    t.caption = f"sum of all balances: {total} (double entry: always 0)"
    out.table(t)
    return 0


def cmd_receipts(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    session = bytes.fromhex(args.session) if args.session else None
    rows = ledger.receipts(
        node=args.node,
        verifier=args.verifier,
        session=session,
        since_ms=args.since,
        limit=args.limit or None,
    )
    if out.as_json:
        out.json({"receipts": [asdict(r) for r in rows]})
        return 0
    t = Table(title=f"Receipts (newest first, {len(rows)} shown)")
    for col in (
        "time (UTC)",
        "verifier",
        "node",
        "session",
        "seq",
        "drafted",
        "accepted",
        "verify ms",
        "draft ms",
        "model",
        "chain #",
    ):
        t.add_column(
            col,
            justify="right"
            if col in ("seq", "drafted", "accepted", "verify ms", "draft ms", "chain #")
            else "left",
        )
    for r in rows:
        t.add_row(
            _ms_text(r.unix_ms),
            _short(r.verifier, out.full),
            _short(r.node, out.full),
            r.session_id if out.full else r.session_id[:12],
            str(r.seq),
            str(r.drafted),
            str(r.accepted),
            f"{r.verify_micros / 1000:.1f}",
            f"{r.draft_micros / 1000:.1f}",
            r.model_id,
            str(r.chain_index),
        )
    out.table(t)
    return 0


def cmd_top(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    rows = ledger.top(by=args.by, limit=args.limit)
    if out.as_json:
        out.json({"by": args.by, "top": rows})
        return 0
    if args.by == "accepted":
        t = Table(title="Top nodes by accepted draft tokens")
        for col in ("#", "node", "accepted", "drafted", "acceptance", "receipts"):
            t.add_column(col, justify="left" if col == "node" else "right")
        for i, r in enumerate(rows, 1):
            rate = r["acceptance_rate"]
            t.add_row(
                str(i),
                _short(str(r["node"]), out.full),
                f"{r['accepted']:,}",
                f"{r['drafted']:,}",
                "" if rate is None else f"{rate:.1%}",
                f"{r['receipts']:,}",
            )
    else:
        t = Table(title="Top peers by credit")
        for col in ("#", "peer", "credit", "draft credit", "verify credit"):
            t.add_column(col, justify="left" if col == "peer" else "right")
        for i, r in enumerate(rows, 1):
            t.add_row(
                str(i),
                _short(str(r["account"]), out.full),
                f"{r['balance']:,}",
                f"{r['draft_credit']:,}",
                f"{r['verify_credit']:,}",
            )
    out.table(t)
    return 0


def cmd_cost(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    p = ledger.prices()
    if args.server_price is not None or args.edge_price is not None:
        p = accounting.Prices(
            server_usd_per_hour=p.server_usd_per_hour
            if args.server_price is None
            else args.server_price,
            edge_usd_per_hour=p.edge_usd_per_hour if args.edge_price is None else args.edge_price,
            server_hardware=p.server_hardware,
            edge_hardware=p.edge_hardware,
        )
    rep = ledger.cost(p, sessions_limit=args.sessions)
    ratios = {
        b.key: (b.usd_per_mtok / rep.overall.usd_per_mtok)
        for b in rep.baselines
        if b.usd_per_mtok and rep.overall.usd_per_mtok
    }
    if out.as_json:
        d = rep.to_dict()
        d["cost_efficiency_vs_baseline"] = ratios
        out.json(d)
        return 0
    out.console.print(
        f"Prices: server {p.server_hardware} ${p.server_usd_per_hour}/h, "
        f"edge {p.edge_hardware} ${p.edge_usd_per_hour}/h. "
        "Tokens served = accepted + 1 bonus token per round."
    )

    def lines_table(title: str, lines: Sequence[accounting.CostLine], key: str) -> Table:
        t = Table(title=title)
        for col in (
            key,
            "rounds",
            "tokens",
            "verify s",
            "draft s",
            "server $",
            "edge $",
            "total $",
            "$/Mtok",
        ):
            t.add_column(col, justify="left" if col == key else "right")
        for c in lines:
            t.add_row(
                _short(c.key, out.full),
                f"{c.receipts:,}",
                f"{c.tokens:,}",
                f"{c.verify_seconds:,.2f}",
                f"{c.draft_seconds:,.2f}",
                _usd(c.server_usd),
                _usd(c.edge_usd),
                _usd(c.total_usd),
                _usd(c.usd_per_mtok),
            )
        return t

    out.table(lines_table("SpecEdge cost, overall", [rep.overall], "scope"))
    out.table(lines_table("Per verifier", rep.by_verifier, "verifier"))
    out.table(lines_table("Per node", rep.by_node, "node"))
    out.table(
        lines_table(f"Per session (top {args.sessions} by tokens)", rep.by_session, "session")
    )
    if rep.baselines:
        t = lines_table("Benchmark baselines at the same prices", rep.baselines, "mode")
        t.caption = "; ".join(
            f"SpecEdge is {r:.2f}x as cost-efficient as {k}" for k, r in ratios.items()
        )
        out.table(t)
    return 0


def cmd_verify(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    anchor = None
    if args.anchor:
        data = json.loads(Path(args.anchor).read_text())
        anchor = data["heads"] if isinstance(data, dict) else data
    rep = ledger.verify(anchor=anchor, jobs=args.jobs)
    if out.as_json:
        out.json(rep.to_dict())
        return 0 if rep.ok else EXIT_BAD
    summary = (
        f"{rep.receipts:,} receipts in {rep.chains} chains, {rep.credit_entries:,} credit entries, "
        f"{rep.peers} peers, {rep.sessions:,} sessions, {rep.proofs} fraud proofs checked in "
        f"{rep.seconds:.2f} s"
    )
    if rep.ok:
        out.console.print(f"[green]OK[/green]: {summary}; every signature, link and leg is intact.")
        return 0
    out.console.print(f"[red]TAMPERED[/red]: {summary}.")
    out.console.print(f"First bad row: [bold]{rep.first}[/bold]")
    t = Table(title=f"Problems ({rep.problems_total} in all)")
    t.add_column("table")
    t.add_column("row")
    t.add_column("what")
    for p in rep.problems[:50]:
        t.add_row(p.table, str(p.row_id), p.message)
    out.table(t)
    return EXIT_BAD


_EXPORT_FIELDS = (
    "peer_id",
    "total_credit",
    "expavg_credit",
    "draft_credit",
    "verify_credit",
    "receipts_as_node",
    "receipts_as_verifier",
    "drafted",
    "accepted",
    "acceptance_rate",
    "tokens_verified",
    "draft_seconds",
    "verify_seconds",
    "sessions_as_node",
    "sessions_as_verifier",
    "first_unix_ms",
    "last_unix_ms",
)


def cmd_frauds(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    """List stored fraud proofs; with FILE, check a proof file (and --store it)."""
    from specedge.ledger.frauds import credit_state, list_proofs, store_proof
    from specedge.protocol.audits import FraudProofError, check_proof

    if args.file:
        data = Path(args.file).read_bytes()
        try:
            found = store_proof(ledger.engine, data) if args.store else check_proof(data)
        except FraudProofError as exc:
            if out.as_json:
                out.json({"valid": False, "error": str(exc)})
            else:
                out.console.print(f"[red]NOT A PROOF[/red]: {exc}")
            return EXIT_BAD
        info = {"valid": True, "accused": found.accused, "node": found.node,
                "position": found.position, "auditors": list(found.auditors),
                "model_id": found.model_id}
        if out.as_json:
            out.json(info)
        else:
            out.console.print(f"[green]VALID[/green]: {found.accused} committed a token at "
                              f"position {found.position} that auditors "
                              f"{', '.join(found.auditors)} show the target would not choose")
        return 0
    proofs = list_proofs(ledger.engine)
    rows = [{"proof_sha256": p.proof_sha256, "accused": p.accused, "node": p.node,
             "model_id": p.model_id, "position": p.position, "auditors": p.auditors,
             "stored_ms": p.stored_ms, "credit": credit_state(ledger.engine, p.accused)}
            for p in proofs]
    if out.as_json:
        out.json(rows)
        return 0
    t = Table(title=f"Fraud proofs ({len(rows)})")
    for col in ("accused", "position", "auditors", "credit", "proof"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["accused"]), str(r["position"]), ", ".join(r["auditors"]),
                  str(r["credit"]), str(r["proof_sha256"])[:16])
    out.table(t)
    return 0


def cmd_export(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    stats = [asdict(s) for s in ledger.peer_stats()]
    if args.format == "json" or out.as_json:
        text = (
            json.dumps({"generated_unix_ms": int(time.time() * 1000), "peers": stats}, indent=2)
            + "\n"
        )
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=_EXPORT_FIELDS, lineterminator="\n")
        w.writeheader()
        for s in stats:
            w.writerow({k: "" if v is None else v for k, v in s.items()})
        text = buf.getvalue()
    if args.output and args.output != "-":
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_heads(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    heads = ledger.heads()
    if out.as_json:
        out.json({"unix_ms": int(time.time() * 1000), "heads": [asdict(h) for h in heads]})
        return 0
    t = Table(title="Chain heads (save with --json; check later with verify --anchor)")
    t.add_column("verifier")
    t.add_column("length", justify="right")
    t.add_column("head hash")
    for h in heads:
        t.add_row(_short(h.verifier, out.full), f"{h.length:,}", h.head_hash)
    out.table(t)
    return 0


def cmd_prices(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    if args.kind is not None:
        if args.usd_per_hour is None:
            raise LedgerError("give the price in $/hour after the kind")
        ledger.set_price(args.kind, args.usd_per_hour, args.hardware)
    p = ledger.prices()
    if out.as_json:
        out.json(asdict(p))
        return 0
    t = Table(title="Price table")
    for col in ("kind", "hardware", "$ / hour"):
        t.add_column(col)
    t.add_row("server", p.server_hardware, f"{p.server_usd_per_hour:g}")
    t.add_row("edge", p.edge_hardware, f"{p.edge_usd_per_hour:g}")
    out.table(t)
    return 0


def cmd_baseline(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    ledger.record_baseline(
        args.mode.replace("-", "_"), args.tokens, args.server_seconds, args.edge_seconds, args.label
    )
    rep = ledger.cost(sessions_limit=0)
    if out.as_json:
        out.json({"baselines": [b.to_dict() for b in rep.baselines]})
        return 0
    out.console.print(f"recorded {args.mode}: {args.tokens} tokens, {args.server_seconds} server s")
    return 0


def cmd_ingest(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    """Load receipts dumped by `dump` (JSON lines of base64 envelopes) into this ledger."""
    counts: dict[str, int] = {}
    errors: list[str] = []
    for name in args.files:
        fh = sys.stdin if name == "-" else open(name)  # noqa: SIM115
        with fh:
            pairs = []
            for line in fh:
                if line.strip():
                    d = json.loads(line)
                    pairs.append((base64.b64decode(d["receipt"]), base64.b64decode(d["request"])))
            for res in ledger.ingest_many(pairs):
                counts[res.status] = counts.get(res.status, 0) + 1
                if res.error is not None and len(errors) < 20:
                    errors.append(str(res.error))
    if out.as_json:
        out.json({"counts": counts, "errors": errors})
    else:
        out.console.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing")
        for e in errors:
            out.console.print(f"[red]rejected[/red] {e}")
    return EXIT_BAD if counts.get("rejected") else 0


def cmd_dump(ledger: Ledger, args: argparse.Namespace, out: Output) -> int:
    """Every signed pair as JSON lines: the evidence another ledger can ingest and check."""
    fh = open(args.output, "w") if args.output and args.output != "-" else sys.stdout  # noqa: SIM115
    n = 0
    try:
        for receipt_env, request_env in ledger.iter_receipt_pairs():
            fh.write(
                json.dumps(
                    {
                        "receipt": base64.b64encode(receipt_env).decode(),
                        "request": base64.b64encode(request_env).decode(),
                    }
                )
                + "\n"
            )
            n += 1
    finally:
        if fh is not sys.stdout:
            fh.close()
    if fh is not sys.stdout:
        Console(stderr=True).print(f"{n} receipts written to {args.output}")
    return 0


def cmd_flush(ledger_url: str | None, args: argparse.Namespace, out: Output) -> int:
    from specedge.ledger.spool import SpoolingLedger

    with SpoolingLedger(ledger_url, args.spool_dir, retry_interval=0) as sl:
        res = sl.flush()
    if out.as_json:
        out.json(asdict(res))
    else:
        out.console.print(
            f"stored {res.stored}, duplicates {res.duplicate}, rejected {res.rejected}, "
            f"still spooled {res.remaining}" + ("" if res.database_up else " (database down)")
        )
    return 0 if res.database_up else EXIT_UNAVAILABLE


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `--json` after the command must not reset one given before it.
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print JSON instead of tables",
    )
    common.add_argument(
        "--full-ids",
        action="store_true",
        default=argparse.SUPPRESS,
        help="do not shorten peer and session ids in tables",
    )
    p = argparse.ArgumentParser(
        prog="specedge-ledger",
        description="Inspect, check and export a SpecEdge ledger.",
        parents=[common],
    )
    p.add_argument(
        "--ledger",
        metavar="URL",
        default=None,
        help="SQLite file path or sqlite:///..., or postgresql+psycopg://user@host/db "
        "(default: $SPECEDGE_LEDGER, else ledger.sqlite3 in the user data dir)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("balance", parents=[common], help="credit balances (all, or one peer)")
    s.add_argument("peer", nargs="?")
    s.set_defaults(func=cmd_balance)

    s = sub.add_parser("receipts", parents=[common], help="list receipts, newest first")
    s.add_argument("--node")
    s.add_argument("--verifier")
    s.add_argument("--session", help="session id in hex")
    s.add_argument("--since", type=parse_since, help="2h, 7d, ISO date/time or unix time")
    s.add_argument("--limit", type=int, default=100, help="0 for all (default 100)")
    s.set_defaults(func=cmd_receipts)

    s = sub.add_parser("top", parents=[common], help="leading nodes or peers")
    s.add_argument("--by", choices=("accepted", "credit"), default="accepted")
    s.add_argument("--limit", type=int, default=10)
    s.set_defaults(func=cmd_top)

    s = sub.add_parser("cost", parents=[common], help="$ per 1M tokens, with baselines")
    s.add_argument("--server-price", type=float, help="override server $/hour")
    s.add_argument("--edge-price", type=float, help="override edge $/hour")
    s.add_argument("--sessions", type=int, default=20, help="sessions to list (default 20)")
    s.set_defaults(func=cmd_cost)

    s = sub.add_parser(
        "verify", parents=[common], help="re-check every signature, the chains and the credit"
    )
    s.add_argument("--anchor", help="JSON from an earlier `heads --json`")
    s.add_argument("--jobs", type=int, default=1, help="processes for signature checks")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("frauds", parents=[common],
                       help="fraud proofs held, or check one (FILE) without trusting anyone")
    s.add_argument("file", nargs="?", metavar="FILE",
                   help="a fraud proof file (specedge-node writes them) to check")
    s.add_argument("--store", action="store_true", help="keep FILE in the ledger if valid")
    s.set_defaults(func=cmd_frauds)

    s = sub.add_parser("export", parents=[common], help="per-peer statistics (CSV or JSON)")
    s.add_argument("--format", choices=("csv", "json"), default="csv")
    s.add_argument("--output", "-o", help="file (default stdout)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("heads", parents=[common], help="chain lengths and head hashes")
    s.set_defaults(func=cmd_heads)

    s = sub.add_parser("prices", parents=[common], help="show or set the price table")
    s.add_argument("kind", nargs="?", choices=("server", "edge"))
    s.add_argument("usd_per_hour", nargs="?", type=float)
    s.add_argument("--hardware", help="hardware name shown with the price")
    s.set_defaults(func=cmd_prices)

    s = sub.add_parser(
        "baseline",
        parents=[common],
        help="record a benchmark's server-only or autoregressive timings",
    )
    s.add_argument("mode", choices=("server-only", "autoregressive"))
    s.add_argument("--tokens", type=int, required=True)
    s.add_argument("--server-seconds", type=float, required=True)
    s.add_argument("--edge-seconds", type=float, default=0.0)
    s.add_argument("--label", default="")
    s.set_defaults(func=cmd_baseline)

    s = sub.add_parser("ingest", parents=[common], help="load receipts written by `dump`")
    s.add_argument("files", nargs="+", help="JSON-lines files ('-' for stdin)")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("dump", parents=[common], help="write every signed receipt pair")
    s.add_argument("--output", "-o")
    s.set_defaults(func=cmd_dump)

    s = sub.add_parser("flush", parents=[common], help="store what a verifier spooled")
    s.add_argument("spool_dir")
    s.set_defaults(func=cmd_flush)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(getattr(args, "json", False), getattr(args, "full_ids", False))
    err = Console(stderr=True)
    try:
        if args.func is cmd_flush:
            return cmd_flush(args.ledger, args, out)
        with open_ledger(args.ledger) as ledger:
            return int(args.func(ledger, args, out))
    except LedgerUnavailable as exc:
        err.print(f"[red]ledger database unreachable[/red]: {exc}")
        return EXIT_UNAVAILABLE
    except (LedgerError, ReceiptRejected, ValueError) as exc:
        err.print(f"[red]error[/red]: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
