"""The acceptance rule: one implementation, used by every verifier and every test.

SpecExec-style: the target chooses its own token at every node of the tree (argmax when
greedy, a seeded sample otherwise; see `sampling`). Starting at the root, a child is
accepted when its token equals the target's choice at its parent. The accepted path ends
at the first node none of whose children match; the target's choice there is the bonus
token. Every emitted token is the target's own choice, which is why greedy output equals
target-only greedy output and sampled output follows the target's distribution exactly.
"""

from __future__ import annotations

from collections.abc import Sequence


def accept(
    tokens: Sequence[int], parents: Sequence[int], target_tokens: Sequence[int]
) -> tuple[list[int], int]:
    """Return (accepted node indices root-to-leaf, bonus token).

    `tokens`/`parents` are the draft tree (parent -1 = the root). `target_tokens` has one
    entry more than `tokens`: index 0 is the target's choice after the root, index i + 1 its
    choice after draft node i.
    """
    if len(target_tokens) != len(tokens) + 1:
        raise ValueError("target_tokens needs one entry for the root and one per node")
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    path: list[int] = []
    node = -1
    while True:
        want = int(target_tokens[node + 1])
        nxt = next((c for c in children.get(node, ()) if tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt
