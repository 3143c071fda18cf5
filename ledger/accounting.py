"""Credit and cost rules.

Credit (integer token units, double entry). For each receipt:

    node      +accepted   kind "draft"    (its draft tokens the target accepted)
    @network  -accepted   kind "draft"
    verifier  +drafted    kind "verify"   (tokens it verified: the request's tree size)
    @network  -drafted    kind "verify"

`@network` is the issuing account (BOINC-style: credit is granted for work done, nobody
pays it), so every receipt's legs sum to zero and so do all balances. The rule is fixed,
so `verify` recomputes every leg from the signed receipt.

Cost: verifier compute seconds x server $/h + edge draft seconds x edge $/h, per 1M
tokens served, where a receipt serves accepted + 1 tokens (the accepted path and the
verifier's bonus token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

NETWORK_ACCOUNT = "@network"  # '@' never starts a base58 peer id
KIND_DRAFT = "draft"
KIND_VERIFY = "verify"

# The SpecEdge paper's prices (NeurIPS 2025, cost-efficiency table).
DEFAULT_SERVER = ("NVIDIA A100 80GB", 5.05)
DEFAULT_EDGE = ("NVIDIA RTX 4090", 0.35)

BASELINE_MODES = ("server_only", "autoregressive")


def credit_legs(
    node: str, verifier: str, drafted: int, accepted: int
) -> list[tuple[str, str, int]]:
    """The (account, kind, amount) rows one receipt writes; they sum to zero."""
    return [
        (node, KIND_DRAFT, accepted),
        (NETWORK_ACCOUNT, KIND_DRAFT, -accepted),
        (verifier, KIND_VERIFY, drafted),
        (NETWORK_ACCOUNT, KIND_VERIFY, -drafted),
    ]


def served_tokens(accepted: int) -> int:
    """Tokens a round gives the user: the accepted path plus the bonus token."""
    return accepted + 1


@dataclass(frozen=True)
class Prices:
    server_usd_per_hour: float = DEFAULT_SERVER[1]
    edge_usd_per_hour: float = DEFAULT_EDGE[1]
    server_hardware: str = DEFAULT_SERVER[0]
    edge_hardware: str = DEFAULT_EDGE[0]


@dataclass(frozen=True)
class CostLine:
    """Cost of a group of receipts (or of a baseline run)."""

    key: str
    receipts: int
    tokens: int
    verify_seconds: float
    draft_seconds: float
    server_usd: float
    edge_usd: float

    @property
    def total_usd(self) -> float:
        return self.server_usd + self.edge_usd

    @property
    def usd_per_mtok(self) -> float | None:
        return self.total_usd / self.tokens * 1e6 if self.tokens else None

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["total_usd"] = self.total_usd
        d["usd_per_mtok"] = self.usd_per_mtok
        return d


def cost_line(
    key: str, receipts: int, tokens: int, verify_micros: int, draft_micros: int, prices: Prices
) -> CostLine:
    vs, ds = verify_micros / 1e6, draft_micros / 1e6
    return CostLine(
        key=key,
        receipts=receipts,
        tokens=tokens,
        verify_seconds=vs,
        draft_seconds=ds,
        server_usd=vs * prices.server_usd_per_hour / 3600.0,
        edge_usd=ds * prices.edge_usd_per_hour / 3600.0,
    )


def baseline_line(
    key: str, tokens: int, server_seconds: float, edge_seconds: float, prices: Prices
) -> CostLine:
    """A benchmark's server-only-speculative or autoregressive run at the same prices."""
    return CostLine(
        key=key,
        receipts=0,
        tokens=tokens,
        verify_seconds=server_seconds,
        draft_seconds=edge_seconds,
        server_usd=server_seconds * prices.server_usd_per_hour / 3600.0,
        edge_usd=edge_seconds * prices.edge_usd_per_hour / 3600.0,
    )
