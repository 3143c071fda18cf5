"""Standing: what a node has earned, as this verifier can prove it, and what it buys.

Definition (the README repeats it):

    standing(node, now) = GRANT + sum over the node's credit entries e of
                          e.amount * 2 ** (-(now - e.time) / HALF_LIFE)

The credit entries are the ledger's: accepted draft tokens for a node, verified tokens
for a verifier (so a volunteer running a verifier earns standing for its node identity
too), each from a receipt that carries both signatures. Nothing is subtracted for using
the network (volunteer work is not bought), and credit a verifier forfeits for a proven
fraud is gone with it. Old work fades with a half-life of a week: standing follows
what a peer does, not what it once did. Every identity starts with the same small
GRANT, so a fresh identity (a Sybil) is never ahead of anyone who has done anything.

Sources, in order of trust: this verifier's own ledger (or its fleet's shared
PostgreSQL ledger), then a standing statement another verifier signed for the node, if
this verifier accepts that issuer (`--accept-standing-from`); a statement counts for at
most what it says, decayed from when it was signed, and never adds to local credit (the
larger of the two is used).

What it buys, under load only: a verify request's place in the queue when a pass cannot
take every waiting request (ranked by waited time plus a boost that grows with the log
of standing, so waiting still raises everyone and nobody starves), and the last quarter
of the session slots, which fresh identities cannot take.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

log = logging.getLogger("specedge.verifier.standing")

GRANT = 100.0  # tokens of credit every identity starts with
HALF_LIFE_S = 7 * 24 * 3600.0
REFRESH_S = 30.0  # how stale a ledger-derived standing may be
RESERVED_SLOTS = 0.25  # share of session slots only earned standing may take
MAX_STATEMENT_AGE_S = 7 * 24 * 3600.0
CLASSES = ("fresh", "earned", "high")  # standing <= GRANT, <= 100 * GRANT, above


def decayed(buckets: list[tuple[int, float]], now_ms: int,
            half_life_s: float = HALF_LIFE_S) -> float:
    """Sum of (time_ms, amount) credit buckets, each halved per half-life of age."""
    total = 0.0
    for at_ms, amount in buckets:
        age = max(now_ms - at_ms, 0) / 1000.0
        total += amount * 2.0 ** (-age / half_life_s)
    return total


def standing_class(value: float) -> str:
    """A coarse label for metrics: fresh, earned or high."""
    if value <= GRANT:
        return "fresh"
    return "earned" if value <= 100 * GRANT else "high"


def boost(value: float, unit_s: float) -> float:
    """Seconds of head start in the queue: `unit_s` per doubling of standing over the
    grant. A node with 1000x the grant waits about 10 units less than a fresh one, and
    a fresh one that has waited that long goes first."""
    return unit_s * math.log2(max(value, GRANT) / GRANT)


@dataclass
class _Known:
    value: float
    at: float  # monotonic time it was computed


class Standings:
    """Standing per peer, from a ledger, refreshed at most every REFRESH_S seconds.

    `earned(peer)` must be cheap (the scheduler asks per request): values are cached and
    recomputed off the event loop by `refresh` (a blocking ledger query, run in a thread
    by the verifier), so a slow database delays standing, never a pass.
    """

    def __init__(self, ledger: object | None, half_life_s: float = HALF_LIFE_S) -> None:
        self.ledger = ledger  # anything with earned_buckets(account) -> [(ms, amount)]
        self.half_life_s = half_life_s
        self.known: dict[str, _Known] = {}
        self.claimed: dict[str, float] = {}  # from accepted statements, decayed at use
        self.stale: set[str] = set()

    def earned(self, peer: str) -> float:
        """The peer's standing as last computed (the grant until then)."""
        known = self.known.get(peer)
        if known is None or time.monotonic() - known.at > REFRESH_S:
            self.stale.add(peer)
        local = known.value if known is not None else GRANT
        return max(local, self.claimed.get(peer, 0.0))

    def refresh(self, peers: set[str] | None = None) -> None:
        """Recompute the standing of `peers` (default: every stale one) from the ledger
        (blocking: run it in a thread)."""
        if peers is None:
            peers, self.stale = self.stale, set()
        now_ms = int(time.time() * 1000)
        for peer in peers:
            value = GRANT
            if self.ledger is not None:
                try:
                    value += decayed(self.ledger.earned_buckets(peer), now_ms,
                                     self.half_life_s)
                except Exception as exc:  # the database is down: keep what we had
                    log.warning("standing of %s not refreshed: %s", peer, exc)
                    self.stale.add(peer)
                    continue
            self.known[peer] = _Known(value, time.monotonic())
            self.stale.discard(peer)

    def knows(self, peer: str) -> bool:
        return peer in self.known

    def accept_claim(self, peer: str, value: float) -> None:
        """A checked statement from a trusted issuer: at most what it says."""
        self.claimed[peer] = max(self.claimed.get(peer, 0.0), value)
