"""Helpers shared by tests (importable as `support`)."""

from __future__ import annotations

import torch


def hf_greedy(model, prompt: list[int], n: int, eos: list[int]) -> list[int]:
    """Target-only greedy output from Hugging Face's own generate()."""
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=eos,
        pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt):].tolist()
