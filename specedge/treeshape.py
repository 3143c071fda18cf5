"""The shape a draft tree may grow to: what the CLIs parse, without loading torch.

It lives apart from `specedge.trees` (which needs torch) so that `--help` and the
argument parsers of every command stay light."""

from __future__ import annotations

from dataclasses import dataclass

# The shape nodes draft by default: the best of `specedge bench --sweep` on the demo pair
# (README, "Trees, bets and the user's alternative").
DEFAULT_TREE = "chain:6"
DYNAMIC_WIDTH = 4  # dynamic trees: children per node, and nodes added per draft pass
DYNAMIC_DEPTH = 12


@dataclass(frozen=True)
class TreeShape:
    """How big a draft tree may grow: total tokens, tokens on one path, children per node.

    `dynamic`: the budget is a ceiling; the drafter stops earlier where one more node's
    draft probability no longer pays for its row on the verifier (`specedge.costs`).
    """

    budget: int = 8
    max_depth: int = 8
    max_width: int = 1
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.budget < 1 or self.max_depth < 1 or self.max_width < 1:
            raise ValueError(f"tree shape needs positive sizes, got {self}")

    @classmethod
    def chain(cls, length: int) -> TreeShape:
        return cls(budget=length, max_depth=length, max_width=1)

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """'chain:N', 'tree:BUDGET,DEPTH,WIDTH' or 'dynamic:BUDGET[,WIDTH]' (--tree)."""
        kind, _, rest = text.partition(":")
        try:
            if kind == "chain":
                return cls.chain(int(rest))
            if kind == "tree":
                budget, depth, width = (int(x) for x in rest.split(","))
                return cls(budget, depth, width)
            if kind == "dynamic":
                budget, *more = (int(x) for x in rest.split(","))
                if len(more) <= 1:
                    width = more[0] if more else DYNAMIC_WIDTH
                    return cls(budget, min(budget, DYNAMIC_DEPTH), width, dynamic=True)
        except ValueError:
            pass
        raise ValueError("tree shape must be 'chain:N', 'tree:BUDGET,DEPTH,WIDTH' or "
                         f"'dynamic:BUDGET[,WIDTH]', got {text!r}")

    def spec(self) -> str:
        """The text `parse` reads back."""
        if self.dynamic:
            return f"dynamic:{self.budget},{self.max_width}"
        if self.max_width == 1 and self.max_depth == self.budget:
            return f"chain:{self.budget}"
        return f"tree:{self.budget},{self.max_depth},{self.max_width}"
