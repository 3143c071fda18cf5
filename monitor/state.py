"""The swarm as the monitor sees it, built from one crawl after another.

Three sets of peers, each peer in at most one:

- **verifiers**: answered the last advert query with a valid Advertisement. They carry
  their advertised figures, a tokens/s rate from two readings of their committed-token
  counter, and the uptime the monitor saw (since it first saw them alive, or since their
  counter went backwards: a restart).
- **misbehaving**: claim to serve a model (a DHT provider record, or an earlier good
  answer) and answered the last query wrongly: garbage, a wrong message, an invalid
  advertisement, or nothing in time. Shown as such, with what went wrong.
- **gone**: verifiers and misbehaving peers that could no longer be reached (or said
  they were shutting down). Left off the page at once, kept an hour in ``/api/state``.

The snapshot (``Swarm.snapshot``) is the ``/api/state`` document; the page is rendered
from it, so the two never disagree. Peers' strings are stored as sent: escaping is the
renderer's job (``page.py``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from specedge.monitor.crawl import GONE, MISBEHAVING, NOT_VERIFIER, VERIFIER, Answer, Crawl
from specedge.protocol import specedge_pb2 as pb

GONE_KEEP_S = 3600.0  # a gone verifier stays in the API's "gone" list this long
HISTORY_S = 2 * 3600.0  # totals kept for the throughput plot
AUDIT_UNKNOWN = "unknown"  # no audits exist yet; a later protocol adds them


def reachability(addrs: Iterable[str]) -> str:
    """"relayed" when the peer announces a /p2p-circuit address (a verifier reserves a
    relay slot when it finds it cannot be dialled), "direct" otherwise, "unknown" with
    no address at all."""
    addrs = list(addrs)
    if not addrs:
        return "unknown"
    return "relayed" if any("/p2p-circuit" in a for a in addrs) else "direct"


@dataclass
class VerifierView:
    peer_id: str
    advert: pb.Advertisement
    addrs: list[str]
    rtt_s: float
    first_seen: float  # unix seconds: start of the current stretch alive
    last_seen: float
    tokens_per_s: float | None = None
    bad_answers: int = 0  # wrong answers over the monitor's life
    reading: tuple[float, int] = (0.0, 0)  # (time, committed tokens) of the last answer

    def update(self, answer: Answer, now: float) -> None:
        """Take a fresh valid answer: figures, rate from the counter, restart check."""
        advert = answer.advert
        assert advert is not None
        then, count = self.reading
        if advert.committed_tokens < count:  # the counter went back: a restart
            self.first_seen, self.tokens_per_s = now, None
        elif now > then and then:
            self.tokens_per_s = (advert.committed_tokens - count) / (now - then)
        self.reading = (now, advert.committed_tokens)
        self.advert, self.addrs, self.rtt_s, self.last_seen = (
            advert, answer.addrs, answer.rtt_s, now)

    def to_dict(self, now: float) -> dict[str, object]:
        a = self.advert
        return {
            "peer_id": self.peer_id,
            "model_id": a.model_id,
            "revision": a.revision,
            "reachability": reachability(self.addrs),
            "addrs": self.addrs,
            "free_slots": a.free_slots,
            "queue_depth": a.queue_depth,
            "verify_ms": a.mean_verify_micros / 1000.0,
            "sessions": a.sessions_open,
            "committed_tokens": a.committed_tokens,
            "tokens_per_s": self.tokens_per_s,
            "max_batch_tokens": a.max_batch_tokens,
            "max_tree_tokens": a.max_tree_tokens,
            "protocol_version": a.protocol_version,
            "rtt_ms": round(self.rtt_s * 1000.0, 2),
            "uptime_s": max(0.0, now - self.first_seen),
            "first_seen_unix": self.first_seen,
            "last_seen_unix": self.last_seen,
            "audit": AUDIT_UNKNOWN,
            "bad_answers": self.bad_answers,
        }


@dataclass
class Trouble:
    """A peer that claims to serve a model and answered wrongly."""

    peer_id: str
    model_id: str  # what it claimed or last advertised ("" when unknown)
    addrs: list[str]
    problem: str
    since: float
    last_seen: float
    count: int = 1  # wrong answers over the monitor's life

    def to_dict(self) -> dict[str, object]:
        return {"peer_id": self.peer_id, "model_id": self.model_id, "addrs": self.addrs,
                "reachability": reachability(self.addrs), "problem": self.problem,
                "since_unix": self.since, "last_seen_unix": self.last_seen,
                "bad_answers": self.count}


@dataclass
class Gone:
    peer_id: str
    model_id: str
    last_seen: float
    why: str

    def to_dict(self) -> dict[str, object]:
        return {"peer_id": self.peer_id, "model_id": self.model_id,
                "last_seen_unix": self.last_seen, "why": self.why}


@dataclass
class CrawlInfo:
    started: float
    seconds: float
    walked: int
    asked: int
    kinds: dict[str, int]


@dataclass
class Swarm:
    """Everything the page and the API show; updated by ``apply`` after each crawl."""

    refresh_s: float
    peer_id: str = ""
    clock: Callable[[], float] = time.time
    verifiers: dict[str, VerifierView] = field(default_factory=dict)
    troubles: dict[str, Trouble] = field(default_factory=dict)
    gone: dict[str, Gone] = field(default_factory=dict)
    history: deque[dict[str, object]] = field(default_factory=deque)
    last_crawl: CrawlInfo | None = None
    crawls: int = 0
    peers: int = 0  # peers that answered anything in the last crawl
    ledger: dict[str, object] | None = None  # the leaderboard document, with --ledger
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.started or self.clock()

    # -- updates -----------------------------------------------------------------

    def apply(self, crawl: Crawl) -> None:
        """Fold one crawl's answers in, then record the totals for the history."""
        now = self.clock()
        for peer, answer in crawl.answers.items():
            claimed = sorted(crawl.claims.get(peer, ()))
            if answer.kind == VERIFIER:
                self._alive(answer, now)
            elif answer.kind == MISBEHAVING or (answer.kind == NOT_VERIFIER and claimed):
                self._misbehaved(answer, claimed[0] if claimed else "", now)
            elif answer.kind == GONE or peer in self.verifiers:
                self._left(peer, answer.problem or "no longer serves adverts", now)
        for peer in [p for p, g in self.gone.items() if now - g.last_seen > GONE_KEEP_S]:
            del self.gone[peer]
        kinds: dict[str, int] = {}
        for a in crawl.answers.values():
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        self.peers = len(crawl.answers) - kinds.get(GONE, 0)
        self.last_crawl = CrawlInfo(crawl.started, crawl.seconds, crawl.walked,
                                    len(crawl.answers), kinds)
        self.crawls += 1
        self._sample(now)

    def _alive(self, answer: Answer, now: float) -> None:
        peer = answer.peer_id
        view = self.verifiers.get(peer)
        if view is None:
            trouble = self.troubles.pop(peer, None)
            assert answer.advert is not None
            view = VerifierView(peer, answer.advert, answer.addrs, answer.rtt_s, now, now,
                                bad_answers=trouble.count if trouble else 0)
            self.verifiers[peer] = view
        self.gone.pop(peer, None)
        view.update(answer, now)

    def _misbehaved(self, answer: Answer, claimed: str, now: float) -> None:
        peer = answer.peer_id
        view = self.verifiers.pop(peer, None)
        trouble = self.troubles.get(peer)
        if trouble is None:
            model = claimed or (view.advert.model_id if view else "")
            count = view.bad_answers if view else 0
            trouble = self.troubles[peer] = Trouble(peer, model, answer.addrs, answer.problem,
                                                    now, now, count)
        trouble.problem, trouble.addrs, trouble.last_seen = answer.problem, answer.addrs, now
        trouble.model_id = claimed or trouble.model_id  # a provider record may come late
        trouble.count += 1
        self.gone.pop(peer, None)

    def _left(self, peer: str, why: str, now: float) -> None:
        view = self.verifiers.pop(peer, None)
        trouble = self.troubles.pop(peer, None)
        if view is not None:
            self.gone[peer] = Gone(peer, view.advert.model_id, view.last_seen, why)
        elif trouble is not None:
            self.gone[peer] = Gone(peer, trouble.model_id, trouble.last_seen, why)

    def _sample(self, now: float) -> None:
        totals = self.totals()
        self.history.append({"t": now, "verifiers": totals["verifiers"],
                             "sessions": totals["sessions"],
                             "tokens_per_s": totals["tokens_per_s"]})
        while self.history and now - float(self.history[0]["t"]) > HISTORY_S:  # type: ignore[arg-type]
            self.history.popleft()

    # -- what the next crawl should look at ----------------------------------------

    def models(self) -> set[str]:
        """Model ids seen served or claimed: the next crawl looks up their providers."""
        return ({v.advert.model_id for v in self.verifiers.values()}
                | {t.model_id for t in self.troubles.values() if t.model_id})

    def known(self) -> list[PeerInfo]:
        """Verifiers and misbehaving peers, to be asked again whatever the walk finds."""
        out = []
        for peer, addrs in ([(v.peer_id, v.addrs) for v in self.verifiers.values()]
                            + [(t.peer_id, t.addrs) for t in self.troubles.values()]):
            try:
                out.append(PeerInfo(ID.from_base58(peer), [Multiaddr(a) for a in addrs]))
            except Exception:  # an address that no longer parses: ask by id alone
                out.append(PeerInfo(ID.from_base58(peer), []))
        return out

    # -- what the page and the API show -------------------------------------------

    def totals(self) -> dict[str, object]:
        views = list(self.verifiers.values())
        rates = [v.tokens_per_s for v in views if v.tokens_per_s is not None]
        return {
            "verifiers": len(views),
            "models": len({v.advert.model_id for v in views}),
            "sessions": sum(v.advert.sessions_open for v in views),
            "free_slots": sum(v.advert.free_slots for v in views),
            "queue_depth": sum(v.advert.queue_depth for v in views),
            "tokens_per_s": sum(rates) if rates else None,
            "misbehaving": len(self.troubles),
            "peers": self.peers,
        }

    def model_rows(self) -> list[dict[str, object]]:
        rows: dict[str, dict[str, object]] = {}
        for v in self.verifiers.values():
            r = rows.setdefault(v.advert.model_id, {
                "model_id": v.advert.model_id, "verifiers": 0, "sessions": 0,
                "free_slots": 0, "queue_depth": 0, "tokens_per_s": None})
            r["verifiers"] += 1  # type: ignore[operator]
            r["sessions"] += v.advert.sessions_open  # type: ignore[operator]
            r["free_slots"] += v.advert.free_slots  # type: ignore[operator]
            r["queue_depth"] += v.advert.queue_depth  # type: ignore[operator]
            if v.tokens_per_s is not None:
                r["tokens_per_s"] = (r["tokens_per_s"] or 0.0) + v.tokens_per_s  # type: ignore[operator]
        return sorted(rows.values(), key=lambda r: (-int(r["verifiers"]), str(r["model_id"])))  # type: ignore[call-overload]

    def snapshot(self) -> dict[str, object]:
        """The ``/api/state`` document (plain JSON types only)."""
        now = self.clock()
        crawl = None
        if self.last_crawl is not None:
            c = self.last_crawl
            crawl = {"started_unix": c.started, "seconds": round(c.seconds, 3),
                     "walked": c.walked, "asked": c.asked, "answers": dict(c.kinds)}
        views = sorted(self.verifiers.values(), key=lambda v: (v.advert.model_id, v.peer_id))
        return {
            "generated_unix": now,
            "refresh_s": self.refresh_s,
            "monitor": {"peer_id": self.peer_id, "started_unix": self.started,
                        "crawls": self.crawls, "last_crawl": crawl},
            "totals": self.totals(),
            "models": self.model_rows(),
            "verifiers": [v.to_dict(now) for v in views],
            "misbehaving": [t.to_dict() for t in sorted(self.troubles.values(),
                                                        key=lambda t: t.peer_id)],
            "gone": [g.to_dict() for g in sorted(self.gone.values(),
                                                 key=lambda g: -g.last_seen)],
            "history": list(self.history),
            "ledger": self.ledger,
        }
