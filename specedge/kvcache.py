"""KV cache surgery: after a round each side keeps only the accepted path."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def cache_len(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def keep_rows(cache: DynamicCache, rows: Sequence[int] | torch.Tensor) -> None:
    """Keep only the given sequence rows of every layer, in that order (in place)."""
    if not isinstance(cache, DynamicCache):  # a paged session cache does its own
        cache.keep_rows(rows)
        return
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        index = torch.as_tensor(rows, dtype=torch.long, device=layer.keys.device)
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


def layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values) [1, H, T, D], whatever the cache's kind."""
    if not isinstance(cache, DynamicCache):
        return [cache.layer(i) for i in range(cache.num_layers)]
    return [(layer.keys, layer.values) for layer in cache.layers if layer.is_initialized]


def truncate(cache: DynamicCache, length: int) -> None:
    """Drop every row from `length` on."""
    if cache_len(cache) > length:
        keep_rows(cache, range(length))


def copy_rows(cache: DynamicCache, rows: Sequence[int]) -> DynamicCache:
    """A new cache holding the given rows; the original is untouched."""
    out = DynamicCache()
    index = torch.as_tensor(list(rows), dtype=torch.long)
    for i, layer in enumerate(cache.layers):
        idx = index.to(layer.keys.device)
        out.update(layer.keys.index_select(-2, idx), layer.values.index_select(-2, idx), i)
    return out
