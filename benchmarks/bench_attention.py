"""One decoding step's attention (one query per head over a long cache), by layout, against SDPA in the same run.

A decoding step is memory-bound: each call reads the whole cached K and V once. Between calls the benchmark walks
a buffer larger than the last-level cache, as the weights of the rest of the model would, so every call reads K and
V from memory (in a model they are cold too). Prints median microseconds and the ratio to SDPA:

    python benchmarks/bench_attention.py                     # 16 heads x 576 keys x 128 (hidden 2048, one image)
    python benchmarks/bench_attention.py --heads 32 --keys 600 --batch 8

`sum(K)` reads the same bytes with no arithmetic: the floor for one pass over K.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from wings.modeling.buffers import TransposedColumnBuffer
from wings.modeling.few_queries import attention_scores, few_query_attention, weighted_values


def median_us(fn: Callable[[], object], flush: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        flush.add_(1.0)  # evict K and V from the caches
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--keys", type=int, default=576)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--flush-mib", type=int, default=96, help="bigger than the last-level cache")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    B, H, S, D = args.batch, args.heads, args.keys, args.head_dim
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for n in (1, S, S))
    v_transposed = TransposedColumnBuffer(v).view  # [B, H, S, D] over a [B, H, D, S] store
    probs = torch.softmax(torch.randn(B, H, 1, S, generator=gen), dim=-1)
    mask = torch.zeros(B, 1, 1, S)
    flush = torch.zeros(args.flush_mib * 2**20 // 4)
    scale = D**-0.5
    cases = {
        "SDPA (scores and values)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "few-query attention, V as cached [S, D]": lambda: few_query_attention(q, k, v, mask),
        "few-query attention, V stored [D, S]": lambda: few_query_attention(q, k, v_transposed, mask),
        "scores q @ K^T": lambda: torch.matmul(q * scale, k.transpose(-1, -2)),
        "scores (K q^T)^T": lambda: attention_scores(q, k, scale),
        "values p @ V, V [S, D]": lambda: torch.matmul(probs, v),
        "values (V^T p^T)^T, V stored [D, S]": lambda: weighted_values(probs, v_transposed),
        "sum(K) (one pass, no arithmetic)": lambda: k.sum(),
    }
    print(f"batch {B}, {H} heads x {S} keys x head size {D}, fp32, {torch.get_num_threads()} thread(s); "
          f"K and V {2 * k.numel() * 4 / 2**20:.1f} MiB, evicted before each call; median of {args.repeats}")
    base = None
    for name, fn in cases.items():
        us = median_us(fn, flush, args.repeats)
        base = base or us
        print(f"  {name:40s} {us:9.1f} us   {us / base:5.2f} x SDPA")


if __name__ == "__main__":
    main()
