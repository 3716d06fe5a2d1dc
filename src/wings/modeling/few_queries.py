"""Attention of a few queries (a decoding step) over many cached keys, laid out to stream the cache.

A decoding step reads every cached key and value for one query per head: it is memory-bound, and how the two
products are laid out decides how fast that read goes. Measured on the development machine (AMD EPYC, MKL, one
thread, 16 heads x 576 keys x head size 128, fp32, cache evicted between calls; `benchmarks/bench_attention.py`):

    scores  q @ K^T   (the layout of SDPA and HF's eager attention)     ~0.8 ms
            K @ q^T   (a matrix-vector product over the rows of K)      ~0.4 ms
    values  p @ V     (V stored [S, D], as every KV cache keeps it)     ~0.8 ms
            V^T @ p^T (V stored transposed, [D, S])                     ~0.3 ms
    SDPA, both products                                                 ~1.4 ms

(reading the same 4.5 MiB with `sum` took ~0.27 ms; docs/PERFORMANCE.md has the table at batch 1 and 8). So the
scores are computed as `(K q^T)^T`, and the values as `V^T p^T` where the cache stores them transposed
(`TransposedColumnBuffer`: the learner cache does on the CPU). The results equal SDPA's up to rounding
(tests/test_model_decode_kernels.py).
"""

from __future__ import annotations

import torch

# Up to this many queries per forward (decoding, a few speculative tokens), these paths replace SDPA.
FEW_QUERIES = 16


def few_queries(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether `query` [..., T, D] against `key` [..., S, D] is a decoding step (a few queries, more keys)."""
    T, S = query.shape[-2], key.shape[-2]
    return T <= FEW_QUERIES and T < S


def attention_scores(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """query [..., G, D] (G: the query rows of one key head), key [..., S, D] -> scale * q K^T [..., G, S], computed
    as the transpose of K (scale q)^T."""
    return torch.matmul(key, (query * scale).transpose(-1, -2)).transpose(-1, -2)


def weighted_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs [..., G, S] @ value [..., S, D] -> [..., G, D]; from a transposed store (`value.stride(-2) == 1`) as
    (V^T p^T)^T, which reads V^T row by row."""
    if value.stride(-2) == 1 and value.stride(-1) != 1:
        return torch.matmul(value.transpose(-1, -2), probs.transpose(-1, -2)).transpose(-1, -2)
    return torch.matmul(probs, value)


def few_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, additive_mask: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """Multi-head attention (as SDPA with `attn_mask`) for query [B, H, T, D] over key/value [B, H, S, D];
    `additive_mask` [B, 1, T, S] holds 0 / -inf and every row sees at least one key. Softmax in fp32, as SDPA."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = attention_scores(query, key, scale) + additive_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return weighted_values(probs, value)
