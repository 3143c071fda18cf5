"""Token trees: masks, positions and growth limits (property tests with hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specedge.drafter import Drafter
from specedge.trees import (
    TokenTree,
    TreeShape,
    ancestor_matrix,
    depths,
    tree_mask,
    tree_positions,
    with_root,
)


@st.composite
def parent_lists(draw, max_nodes: int = 24):
    n = draw(st.integers(1, max_nodes))
    return [draw(st.integers(-1, i - 1)) for i in range(n)]


def ancestors_by_walk(parents, i):
    out = {i}
    while parents[i] != -1:
        i = parents[i]
        out.add(i)
    return out


@given(parent_lists(), st.integers(0, 12))
@settings(max_examples=200, deadline=None)
def test_each_node_attends_to_prefix_ancestors_and_itself(parents, prefix_len):
    mask = tree_mask(parents, prefix_len)[0, 0]
    n = len(parents)
    assert mask.shape == (n, prefix_len + n)
    allowed = mask == 0
    assert allowed[:, :prefix_len].all()
    for i in range(n):
        seen = {j for j in range(n) if allowed[i, prefix_len + j]}
        assert seen == ancestors_by_walk(parents, i)


@given(parent_lists(), st.integers(0, 12), st.data())
@settings(max_examples=200, deadline=None)
def test_partial_masks_are_rows_of_the_full_mask(parents, prefix_len, data):
    n = len(parents)
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    full = tree_mask(parents, prefix_len)[0, 0]
    part = tree_mask(parents, prefix_len, start, stop)[0, 0]
    assert torch.equal(part, full[start:stop, : prefix_len + stop])


@given(parent_lists(), st.integers(0, 100))
@settings(max_examples=200, deadline=None)
def test_positions_are_prefix_length_plus_depth(parents, prefix_len):
    pos = tree_positions(parents, prefix_len)[0].tolist()
    for i in range(len(parents)):
        assert pos[i] == prefix_len + len(ancestors_by_walk(parents, i)) - 1


@given(parent_lists())
def test_with_root_puts_every_top_node_under_node_zero(parents):
    full = with_root(parents)
    assert full[0] == -1
    assert depths(full)[1:] == [d + 1 for d in depths(parents)]


@pytest.mark.parametrize("bad", [[0], [-2], [-1, 1], [-1, 0, 5]])
def test_parents_must_point_strictly_backwards(bad):
    with pytest.raises(ValueError, match="strictly backwards"):
        ancestor_matrix(bad)


def test_tree_paths_and_leaves():
    t = TokenTree()
    a = t.add(-1, 5, -0.1)
    b = t.add(a, 6, -0.3)
    c = t.add(-1, 7, -1.0)
    assert t.path(b) == [a, b] and t.path(-1) == []
    assert t.leaves() == [b, c] and t.children(-1) == [a, c]


def test_shape_parse():
    assert TreeShape.parse("chain:3") == TreeShape(3, 3, 1)
    assert TreeShape.parse("tree:16,6,4") == TreeShape(16, 6, 4)
    for bad in ["chain", "tree:1,2", "web:3", "chain:0"]:
        with pytest.raises(ValueError):
            TreeShape.parse(bad)


@pytest.mark.parametrize("shape", [TreeShape.chain(1), TreeShape.chain(6), TreeShape(8, 4, 2),
                                   TreeShape(16, 3, 4), TreeShape(20, 8, 3), TreeShape(5, 2, 8)])
def test_grown_trees_respect_budget_depth_and_width(tiny_pair, tiny_prompts, shape):
    draft = tiny_pair[0]
    for prompt in tiny_prompts[:4]:
        tree = Drafter(draft, shape).draft(prompt)
        assert 1 <= len(tree) <= shape.budget
        assert max(depths(tree.parents)) + 1 <= shape.max_depth
        for node in [-1, *range(len(tree))]:
            kids = tree.children(node)
            assert len(kids) <= shape.max_width
            assert len({tree.tokens[k] for k in kids}) == len(kids)  # no duplicate siblings
        # Fill order keeps cumulative log-probabilities non-increasing along each path.
        for i, p in enumerate(tree.parents):
            if p >= 0:
                assert tree.logprobs[i] <= tree.logprobs[p] + 1e-6
        if shape.max_width == 1:
            assert tree.parents == list(range(-1, len(tree) - 1))  # a chain
            assert len(tree) == shape.budget


def test_chain_is_the_drafts_own_greedy_continuation(tiny_pair, tiny_prompts):
    draft = tiny_pair[0]
    prompt = tiny_prompts[0]
    tree = Drafter(draft, TreeShape.chain(5)).draft(prompt)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(draft(torch.tensor([ids])).logits[0, -1].argmax()))
    assert tree.tokens == ids[len(prompt):]
