"""The monitor's web page: HTML and inline SVG rendered on the server from the
``/api/state`` document.

One renderer for the whole page and for the live part the page fetches again every
refresh period (``render_live``), so the script in the browser only swaps HTML and
never builds markup from peer data. Every string that came from the network (model
ids and revisions are attacker-controlled, addresses, error texts) goes through
``esc``; numbers are formatted here. No external resource is referenced: the style
sheet and the script are served by the monitor itself.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence

MAX_SHOWN_CHARS = 80  # longer peer strings are cut on the page (the API has them whole)


# ---------------------------------------------------------------------------- formatting


def esc(value: object) -> str:
    """Text for HTML content and double- or single-quoted attributes."""
    return html.escape(str(value), quote=True)


def clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_peer(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


def peer_cell(peer_id: str) -> str:
    return f'<td class="peer"><span title="{esc(peer_id)}">{esc(short_peer(peer_id))}</span></td>'


def duration(seconds: float) -> str:
    """12 s, 5 min, 3.2 h, 2.0 d."""
    s = max(0.0, float(seconds))
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def number(value: object, digits: int = 0) -> str:
    """A figure, or an en dash when unknown."""
    if value is None:
        return "–"
    v = float(value)  # type: ignore[arg-type]
    if digits == 0 and v == int(v):
        return f"{int(v):,}"
    return f"{v:,.{digits or 1}f}"


def money(value: object) -> str:
    return "–" if value is None else f"${float(value):,.2f}"  # type: ignore[arg-type]


def ago(unix: float, now: float) -> str:
    return f"{duration(now - unix)} ago"


def clock(unix: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(unix))


def table(cls: str, head: Sequence[str], rows: Sequence[str], empty: str) -> str:
    """A table in a horizontally scrolling box (narrow screens), or a note when empty."""
    if not rows:
        return f'<p class="empty">{esc(empty)}</p>'
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{th}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


# ---------------------------------------------------------------------------- sections


def totals_section(doc: dict) -> str:
    t = doc["totals"]
    cards = [("verifiers", "Verifiers", number(t["verifiers"])),
             ("models", "Models", number(t["models"])),
             ("sessions", "Sessions", number(t["sessions"])),
             ("tokens", "Tokens/s", number(t["tokens_per_s"], 1)),
             ("free", "Free slots", number(t["free_slots"])),
             ("queue", "Queued", number(t["queue_depth"])),
             ("misbehaving", "Misbehaving", number(t["misbehaving"]))]
    items = "".join(f'<div class="card" id="total-{k}"><span class="value">{v}</span>'
                    f'<span class="label">{esc(label)}</span></div>' for k, label, v in cards)
    return f'<section class="totals">{items}</section>'


def models_section(doc: dict) -> str:
    rows = [f'<tr class="model"><td class="model-id">{esc(clip(m["model_id"]))}</td>'
            f'<td>{number(m["verifiers"])}</td><td>{number(m["sessions"])}</td>'
            f'<td>{number(m["free_slots"])}</td><td>{number(m["queue_depth"])}</td>'
            f'<td>{number(m["tokens_per_s"], 1)}</td></tr>' for m in doc["models"]]
    return ("<section><h2>Models served</h2>"
            + table("models", ["model", "verifiers", "sessions", "free slots", "queued",
                               "tokens/s"], rows, "No model is served right now.")
            + "</section>")


def verifier_row(v: dict, now: float) -> str:
    reach = v["reachability"]
    return (f'<tr class="verifier" data-peer="{esc(v["peer_id"])}">{peer_cell(v["peer_id"])}'
            f'<td class="model-id">{esc(clip(v["model_id"]))}</td>'
            f'<td><span class="badge {esc(reach)}">{esc(reach)}</span></td>'
            f'<td>{number(v["free_slots"])}</td><td>{number(v["queue_depth"])}</td>'
            f'<td>{number(v["verify_ms"], 1)}</td><td>{number(v["sessions"])}</td>'
            f'<td>{number(v["tokens_per_s"], 1)}</td><td>{duration(v["uptime_s"])}</td>'
            f'<td title="{esc(clock(v["last_seen_unix"]))}">'
            f'{esc(ago(v["last_seen_unix"], now))}</td>'
            f'<td class="audit">{esc(v["audit"])}</td></tr>')


def verifiers_section(doc: dict) -> str:
    rows = [verifier_row(v, doc["generated_unix"]) for v in doc["verifiers"]]
    empty = ("No verifier answered yet: the first crawl is running."
             if not doc["monitor"]["crawls"] else "No verifier answered the last crawl.")
    head = ["peer", "model", "reach", "free slots", "queued", "verify ms", "sessions",
            "tokens/s", "uptime", "last seen", "audit"]
    return f"<section><h2>Verifiers</h2>{table('verifiers', head, rows, empty)}</section>"


def misbehaving_section(doc: dict) -> str:
    if not doc["misbehaving"]:
        return ""
    now = doc["generated_unix"]
    rows = [f'<tr class="misbehaving" data-peer="{esc(t["peer_id"])}">{peer_cell(t["peer_id"])}'
            f'<td class="model-id">{esc(clip(t["model_id"] or "unknown"))}</td>'
            f'<td class="problem">{esc(clip(t["problem"], 160))}</td>'
            f'<td>{esc(ago(t["since_unix"], now))}</td><td>{number(t["bad_answers"])}</td></tr>'
            for t in doc["misbehaving"]]
    head = ["peer", "claims model", "what went wrong", "since", "bad answers"]
    return ('<section><h2>Misbehaving peers</h2><p class="note">They claim to serve a model '
            "and answered the last advertisement query wrongly. Nodes cannot use them."
            f"</p>{table('troubles', head, rows, '')}</section>")


# ---------------------------------------------------------------------------- plot


def svg_plot(points: Sequence[tuple[float, float]], *, title: str, unit: str) -> str:
    """A line plot of (unix time, value): the lines in an SVG that stretches to its box,
    the labels in HTML around it (so text stays legible from a phone to a wide screen)."""
    if len(points) < 2:
        return f'<p class="empty">{esc(title)}: not enough data yet.</p>'
    width, height = 600, 100  # viewBox units; the box sets the real size
    t0, t1 = points[0][0], points[-1][0]
    top = max(v for _, v in points) * 1.1 or 1.0
    span = (t1 - t0) or 1.0
    line = " ".join(f"{(t - t0) / span * width:.2f},{(1 - v / top) * height:.2f}"
                    for t, v in points)
    svg = (f'<svg class="plot" viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
           f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>'
           f'<polygon class="area" points="0,{height} {line} {width},{height}"/>'
           f'<polyline class="line" points="{line}" vector-effect="non-scaling-stroke"/>'
           f'<line class="axis" x1="0" y1="{height}" x2="{width}" y2="{height}" '
           'vector-effect="non-scaling-stroke"/></svg>')
    return (f'<div class="chart"><div class="yaxis"><span>{esc(number(top, 1))} '
            f'{esc(unit)}</span><span>0</span></div>{svg}<span></span>'
            f'<div class="xaxis"><span>{esc(duration(t1 - t0))} ago</span><span>now</span>'
            "</div></div>")


def throughput_section(doc: dict) -> str:
    ledger = doc.get("ledger")
    if ledger and ledger.get("throughput"):
        pts = [(p["t"], p["tokens_per_s"]) for p in ledger["throughput"]]
        source = "served tokens per second from the ledger's receipts, per minute"
    else:
        pts = [(h["t"], h["tokens_per_s"]) for h in doc["history"]
               if h["tokens_per_s"] is not None]
        source = "committed tokens per second the verifiers advertise, per crawl"
    plot = svg_plot(pts, title="Network throughput", unit="tok/s")
    return (f'<section><h2>Throughput</h2><p class="note">{esc(source)}.</p>'
            f'<div class="plotbox">{plot}</div></section>')


# ---------------------------------------------------------------------------- leaderboard


def leaderboard_section(doc: dict) -> str:
    ledger = doc.get("ledger")
    if ledger is None:
        return ""
    parts = ["<section><h2>Leaderboard</h2>"]
    if ledger.get("error"):
        parts.append(f'<p class="warn">Ledger: {esc(clip(str(ledger["error"]), 200))}</p>')
    if "cost" in ledger:
        parts.append(cost_line(ledger["cost"]))
        parts.append("<h3>Nodes by accepted draft tokens</h3>" + table(
            "nodes", ["node", "accepted", "acceptance", "credit"],
            [f'<tr class="leader-node">{peer_cell(n["peer_id"])}<td>{number(n["accepted"])}</td>'
             f'<td>{percent(n["acceptance"])}</td><td>{number(n["credit"])}</td></tr>'
             for n in ledger["nodes"]], "No receipts yet."))
        parts.append("<h3>Verifiers by tokens verified</h3>" + table(
            "leaders", ["verifier", "tokens verified", "credit", "$ / 1M tokens"],
            [f'<tr class="leader-verifier">{peer_cell(v["peer_id"])}'
             f'<td>{number(v["tokens_verified"])}</td><td>{number(v["credit"])}</td>'
             f'<td>{money(v["usd_per_mtok"])}</td></tr>' for v in ledger["verifiers"]],
            "No receipts yet."))
    parts.append("</section>")
    return "".join(parts)


def percent(value: object) -> str:
    return "–" if value is None else f"{float(value):.1%}"  # type: ignore[arg-type]


def cost_line(cost: dict) -> str:
    p = cost["prices"]
    ours = f"<strong>{money(cost['usd_per_mtok'])}</strong> per 1M tokens served"
    if cost["efficiency_vs_server_only"]:
        versus = (f"server-only speculative decoding {money(cost['server_only_usd_per_mtok'])}:"
                  f" <strong>{cost['efficiency_vs_server_only']:.2f}x</strong> the cost "
                  "efficiency")
    else:
        versus = ("no server-only baseline recorded "
                  "(<code>specedge-ledger baseline server-only ...</code>)")
    return (f'<p class="cost" id="cost">{ours}; {versus}. Prices: server '
            f"{esc(p['server_hardware'])} {money(p['server_usd_per_hour'])}/h, edge "
            f"{esc(p['edge_hardware'])} {money(p['edge_usd_per_hour'])}/h.</p>")


# ---------------------------------------------------------------------------- the page


def render_live(doc: dict) -> str:
    """The part of the page that refreshes itself."""
    crawl, now = doc["monitor"]["last_crawl"], doc["generated_unix"]
    status = f"as of {esc(clock(now))}" + (
        f"; last crawl {esc(ago(crawl['started_unix'], now))}: {number(crawl['walked'])} "
        f"peers walked, {number(crawl['asked'])} asked, {crawl['seconds']:.1f} s"
        if crawl else "; first crawl in progress")
    return (f'<p class="asof" id="asof">{status}</p>' + totals_section(doc)
            + models_section(doc) + verifiers_section(doc) + misbehaving_section(doc)
            + throughput_section(doc) + leaderboard_section(doc))


def render_page(doc: dict, title: str = "SpecEdge network") -> str:
    """The whole page; the script swaps ``#live`` for ``render_live`` every period."""
    refresh = max(1, round(float(doc["refresh_s"])))
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title>"
        '<link rel="stylesheet" href="static/monitor.css">'
        '<link rel="icon" href="static/favicon.svg" type="image/svg+xml">'
        f'<noscript><meta http-equiv="refresh" content="{refresh}"></noscript>'
        '<script src="static/monitor.js" defer></script></head><body>'
        f'<header><h1>{esc(title)}</h1><span id="conn" class="ok">live</span></header>'
        f'<main id="live" data-refresh="{refresh}">{render_live(doc)}</main>'
        f'<footer>Monitor <span title="{esc(doc["monitor"]["peer_id"])}">'
        f'{esc(short_peer(doc["monitor"]["peer_id"]))}</span>; refreshes every {refresh} s; '
        'the same data as JSON: <a href="api/state">/api/state</a>.</footer>'
        "</body></html>\n"
    )
