"""The decoding step's own kernels equal their references: few-query attention == SDPA, the transposed value store
== concatenation, and the growing KV cache == HF's `DynamicCache` through everything `generate` does to a cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from wings.modeling.buffers import TransposedColumnBuffer
from wings.modeling.cache import GrowingDynamicCache, GrowingLayer, WingsDynamicCache, upgrade_cache
from wings.modeling.few_queries import attention_scores, few_query_attention, weighted_values


def additive_mask_case(B: int, T: int, S: int, gen: torch.Generator) -> torch.Tensor:
    """[B, 1, T, S] 0 / -inf, some keys hidden, every row sees at least one key (what `open_empty_rows` leaves)."""
    visible = torch.rand(B, 1, T, S, generator=gen) > 0.3
    visible[..., 0] = True
    return torch.zeros(B, 1, T, S).masked_fill(~visible, float("-inf"))


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("transposed_store", [False, True])
def test_few_query_attention_equals_sdpa(T, transposed_store):
    gen = torch.Generator().manual_seed(0)
    B, H, S, D = 2, 4, 37, 16
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for n in (T, S, S))
    mask = additive_mask_case(B, T, S, gen)
    value = TransposedColumnBuffer(v).view if transposed_store else v
    assert (value.stride(-2) == 1) == transposed_store and torch.equal(value, v)
    got = few_query_attention(q, k, value, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (got - ref).abs().max() <= 1e-5
    got_bf16 = few_query_attention(q.bfloat16(), k.bfloat16(), value.bfloat16(), mask.bfloat16())
    assert got_bf16.dtype == torch.bfloat16 and (got_bf16.float() - ref).abs().max() <= 3e-2


def test_scores_and_values_with_grouped_query_heads():
    """The router's decoding path folds the query heads of one KV head into rows: [B, Hkv, groups * T, D]."""
    gen = torch.Generator().manual_seed(1)
    B, Hkv, G, S, D = 2, 2, 6, 11, 8
    q, k, v = torch.randn(B, Hkv, G, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen), torch.randn(
        B, Hkv, S, D, generator=gen)
    scores = attention_scores(q, k, 0.25)
    assert (scores - 0.25 * q @ k.transpose(-1, -2)).abs().max() <= 1e-5
    probs = scores.softmax(-1)
    for value in (v, TransposedColumnBuffer(v).view):
        assert (weighted_values(probs, value) - probs @ v).abs().max() <= 1e-5


def test_transposed_column_buffer_appends_truncates_and_selects():
    gen = torch.Generator().manual_seed(2)
    first = torch.randn(2, 3, 5, 4, generator=gen)
    parts = [torch.randn(2, 3, 1, 4, generator=gen) for _ in range(70)]
    with torch.no_grad():
        buf = TransposedColumnBuffer(first)
        for part in parts:
            buf.append(part)
        assert torch.equal(buf.view, torch.cat([first, *parts], dim=2)) and buf.view.stride(-2) == 1
        buf.truncate(7)
        buf.append(parts[0])
        assert torch.equal(buf.view, torch.cat([first, *parts[:2], parts[0]], dim=2))
        buf.select_batch(torch.tensor([1, 1, 0]))
        assert torch.equal(buf.view, torch.cat([first, *parts[:2], parts[0]], dim=2)[[1, 1, 0]])
    grad = TransposedColumnBuffer(first.clone().requires_grad_())  # autograd: a functional concatenation
    grad.append(parts[0])
    assert grad.view.requires_grad and torch.equal(grad.view.detach(), torch.cat([first, parts[0]], dim=2))


def kv(gen: torch.Generator, B: int = 2, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, 2, n, 4, generator=gen), torch.randn(B, 2, n, 4, generator=gen)


def assert_same_cache(a, b) -> None:
    assert a.get_seq_length() == b.get_seq_length()
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_growing_cache_equals_dynamic_cache_through_generate_operations():
    gen = torch.Generator().manual_seed(3)
    grown, ref = GrowingDynamicCache(), DynamicCache()

    def update(B: int = 2, n: int = 1, layers: int = 2):
        for idx in range(layers):
            new = kv(gen, B, n)
            out = grown.update(*new, idx)
            assert all(torch.equal(x, y) for x, y in zip(out, ref.update(*new, idx), strict=True))

    with torch.no_grad():
        update(n=9)
        assert all(type(layer) is GrowingLayer for layer in grown.layers)
        update()  # the first append makes spare capacity (one copy of the prompt's keys)
        storage = grown.layers[0].keys.untyped_storage().data_ptr()
        update()
        assert grown.layers[0].keys.untyped_storage().data_ptr() == storage  # appended in place, no copy
        for _ in range(80):  # past the spare capacity: grows, still equal
            update()
        assert_same_cache(grown, ref)
        for cache in (grown, ref):
            cache.crop(-5)  # rejected draft tokens
        update(n=3)
        assert_same_cache(grown, ref)
        for cache in (grown, ref):
            cache.reorder_cache(torch.tensor([1, 0]))  # beam search
        update()
        for cache in (grown, ref):
            cache.batch_repeat_interleave(2)
        update(B=4)
        for cache in (grown, ref):
            cache.batch_select_indices(torch.tensor([0, 3]))
        update()
        assert_same_cache(grown, ref)
        for cache in (grown, ref):
            cache.reset()
        update(n=4)
        assert_same_cache(grown, ref)


def test_growing_cache_with_grad_enabled_leaves_earlier_outputs_alone():
    """With autograd on, an earlier step's keys may be saved for the backward: the next update must not write
    into them."""
    gen = torch.Generator().manual_seed(4)
    cache = GrowingDynamicCache()
    keys, _ = cache.update(*kv(gen, n=3), 0)
    before = keys.clone()
    cache.crop(-1)
    cache.update(*kv(gen), 0)
    assert torch.equal(keys, before)


def test_plain_dynamic_caches_are_upgraded_to_grow_in_place(make_tiny):
    model, _ = make_tiny()
    config = model.config.text_config
    cache = DynamicCache(config=config)
    upgrade_cache(cache)
    assert isinstance(cache, WingsDynamicCache) and all(type(layer) is GrowingLayer for layer in cache.layers)
    lazy = DynamicCache()  # without a config: layers are created at the first update of each index
    upgrade_cache(lazy)
    lazy.update(*kv(torch.Generator().manual_seed(5)), 0)
    assert type(lazy.layers[0]) is GrowingLayer
    sliding = DynamicCache(config=config)
    sliding.layers[0] = DynamicSlidingWindowLayer(sliding_window=4)
    upgrade_cache(sliding)  # a sliding window trims itself with HF's own update
    assert type(sliding.layers[0]) is DynamicSlidingWindowLayer and type(sliding.layers[1]) is GrowingLayer
    assert DynamicLayer in GrowingLayer.__mro__
