"""The acceptance rule on hand-made trees."""

from __future__ import annotations

import pytest

from specedge.acceptance import accept


def test_chain_accepts_the_matching_prefix_and_gives_a_bonus():
    tokens, parents = [10, 11, 12], [-1, 0, 1]
    assert accept(tokens, parents, [10, 11, 99, 7]) == ([0, 1], 99)
    assert accept(tokens, parents, [10, 11, 12, 7]) == ([0, 1, 2], 7)
    assert accept(tokens, parents, [42, 11, 12, 7]) == ([], 42)


def test_tree_follows_the_branch_the_target_chose():
    #        root
    #       /    \
    #     a=1    b=2
    #     |       |  \
    #    c=3     d=4  e=5
    tokens, parents = [1, 2, 3, 4, 5], [-1, -1, 0, 1, 1]
    # target: after root -> 2 (node 1), after node 1 -> 5 (node 4), after node 4 -> 8
    target = [2, 0, 5, 0, 0, 8]
    assert accept(tokens, parents, target) == ([1, 4], 8)
    # Choices at nodes off the accepted path do not matter.
    assert accept(tokens, parents, [2, 3, 5, 9, 9, 8]) == ([1, 4], 8)


def test_empty_tree_yields_the_bonus_only():
    assert accept([], [], [17]) == ([], 17)


def test_needs_a_choice_per_node_plus_root():
    with pytest.raises(ValueError):
        accept([1, 2], [-1, 0], [1, 2])
