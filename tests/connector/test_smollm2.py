"""KV layout conversions: a DynamicCache and kvcache's `[layers, 2, tokens, heads, head_dim]`
carry the same numbers both ways, without loading the model."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvcache.connector.smollm2 import cache_of, kv_of


def _kv(layers: int = 3, tokens: int = 5, heads: int = 2, head_dim: int = 4) -> torch.Tensor:
    return torch.randn(
        layers, 2, tokens, heads, head_dim, generator=torch.Generator().manual_seed(0)
    )


def test_a_cache_round_trips_through_the_kv_layout():
    kv = _kv()
    cache = cache_of(kv)
    assert cache.layers[1].keys.shape == (1, 2, 5, 4)  # transformers' (batch, heads, tokens, dim)
    assert torch.equal(cache.layers[1].values[0, 0, 3], kv[1, 1, 3, 0])
    assert torch.equal(kv_of(cache), kv)


def test_a_prefix_cache_holds_only_the_first_tokens():
    kv = _kv()
    cache = cache_of(kv, tokens=2)
    assert cache.get_seq_length() == 2
    assert torch.equal(kv_of(cache), kv[:, :, :2])


def test_appending_to_the_cache_leaves_the_kv_untouched():
    kv = _kv(tokens=1)
    before = kv.clone()
    cache = cache_of(kv)
    for layer in range(kv.shape[0]):
        cache.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), layer)
    assert torch.equal(kv, before)
    assert cache.get_seq_length() == 2


def test_kv_of_refuses_a_batch_of_two():
    cache = DynamicCache()
    cache.update(torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4), 0)
    with pytest.raises(ValueError, match="batch of 1"):
        kv_of(cache)
