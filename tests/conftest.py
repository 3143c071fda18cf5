"""Shared fixtures: the tiny seeded pair (built once per test session)."""

from __future__ import annotations

import pytest
import torch

from specedge.models import build_tiny

torch.set_num_threads(1)

PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox",
    "import numpy as np\n",
    "SELECT name FROM users WHERE",
    "Translate to French: good morning",
    "Q: what is 17 * 23?\nA:",
    "Once upon a time",
    "x",
]


@pytest.fixture(scope="session")
def tiny_pair():
    target, tok = build_tiny()
    draft, _ = build_tiny(draft=True)
    return draft, target, tok


@pytest.fixture(scope="session")
def tiny_prompts(tiny_pair):
    tok = tiny_pair[2]
    return [tok(p)["input_ids"] for p in PROMPTS]
