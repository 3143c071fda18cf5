"""A verifier's pass cost by rows, and the rule that sizes a dynamic tree against it.

The verifier measures how long its engine takes for a pass of 1, 2, 4, ... rows when it
starts, and sends the points to nodes (SessionOpened.pass_costs, and its Advertisement).
A node growing a `dynamic:` tree adds a node only while the draft model's estimate of its
acceptance pays for the row it adds: on a CPU a row costs in proportion, on a GPU a pass is
flat up to the compute roof, so the same draft model grows small trees on one and large
trees on the other.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CostCurve:
    """Pass seconds by rows: measured points, linear between them, and past the last point
    the last segment's slope (a pass never gets cheaper with more rows)."""

    rows: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.rows or len(self.rows) != len(self.seconds):
            raise ValueError("a cost curve needs one time per row count, and at least one")
        if list(self.rows) != sorted(set(self.rows)) or self.rows[0] < 1:
            raise ValueError(f"row counts must be positive and increasing, got {self.rows}")
        if any(s < 0 for s in self.seconds):
            raise ValueError("pass times cannot be negative")

    @classmethod
    def of(cls, points: Iterable[tuple[int, float]]) -> CostCurve:
        """From (rows, seconds) pairs in any order; a repeated row count keeps its last time."""
        table = dict(points)
        rows = sorted(table)
        # Monotone: a measured dip (noise) must not make a bigger tree look cheaper.
        seconds, best = [], 0.0
        for r in rows:
            best = max(best, table[r])
            seconds.append(best)
        return cls(tuple(rows), tuple(seconds))

    def __call__(self, rows: int) -> float:
        r, s = self.rows, self.seconds
        if len(r) == 1 or rows <= r[0]:
            return s[0]
        hi = min(bisect.bisect_left(r, rows), len(r) - 1)
        slope = (s[hi] - s[hi - 1]) / (r[hi] - r[hi - 1])
        return s[hi - 1] + slope * (rows - r[hi - 1])

    def points(self) -> list[tuple[int, float]]:
        return list(zip(self.rows, self.seconds, strict=True))


def worth_adding(p: float, expected: float, rows: int, cost: CostCurve,
                 overhead_s: float = 0.0) -> bool:
    """Whether one more tree node, accepted with probability `p`, raises tokens per second.

    A round yields `expected` tokens (the bonus plus each node's acceptance probability)
    in overhead + cost(rows) seconds, `rows` counting the verifier's root row. The node
    pays when (expected + p) / t(rows + 1) >= expected / t(rows).
    """
    now = overhead_s + cost(rows)
    after = overhead_s + cost(rows + 1)
    return p * now >= expected * (after - now)
