"""The shape a draft tree may grow to: what the CLIs parse, without loading torch.

It lives apart from `specedge.trees` (which needs torch) so that `--help` and the
argument parsers of every command stay light."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TreeShape:
    """How big a draft tree may grow: total tokens, tokens on one path, children per node."""

    budget: int = 8
    max_depth: int = 8
    max_width: int = 1

    def __post_init__(self) -> None:
        if self.budget < 1 or self.max_depth < 1 or self.max_width < 1:
            raise ValueError(f"tree shape needs positive sizes, got {self}")

    @classmethod
    def chain(cls, length: int) -> TreeShape:
        return cls(budget=length, max_depth=length, max_width=1)

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """'chain:4' or 'tree:BUDGET,DEPTH,WIDTH' (the CLI's --tree argument)."""
        kind, _, rest = text.partition(":")
        try:
            if kind == "chain":
                return cls.chain(int(rest))
            if kind == "tree":
                budget, depth, width = (int(x) for x in rest.split(","))
                return cls(budget, depth, width)
        except ValueError:
            pass
        raise ValueError(f"tree shape must be 'chain:N' or 'tree:BUDGET,DEPTH,WIDTH', got {text!r}")
