"""Analytic forward FLOPs per layer of the main decoder layer vs the Wings additions (per sequence).

    python benchmarks/flops.py                       # Qwen1.5-7B-like and the benchmark's small LLM, T=2048

Counts multiply-adds x2 for matmuls; causal attention counts the visible half of the score matrix.
Backward costs ~2x forward for both, so the forward ratio is also the training-step ratio.
"""

from __future__ import annotations

import argparse


def layer_flops(d: int, d_kv: int, ffn: int, T: int, n_image: int, rank: int, with_router: bool = True) -> dict:
    n_image = min(n_image, T)
    text = T - n_image
    base_proj = 2 * T * (2 * d * d + 2 * d * d_kv)  # q, o full width; k, v at kv width
    base_attn = 2 * 2 * (T * T / 2) * d  # QK^T and PV over the causal half
    base_mlp = 2 * T * 3 * d * ffn
    base = base_proj + base_attn + base_mlp
    low_rank = lambda n: 2 * n * 2 * d * rank  # noqa: E731  (down + up on n tokens)
    textual = 2 * low_rank(T) + 2 * low_rank(text) + 2 * 2 * (T * text / 2) * d  # q,o on queries; k,v on keys
    visual = 2 * low_rank(T) + 2 * low_rank(n_image) + 2 * 2 * T * n_image * d  # image keys: at most n_image each
    router = 2 * 2 * (T * T / 2) * d if with_router else 0  # one more attention pass (values padded to head_dim)
    extra = textual + visual + router
    return {"base": base, "textual": textual, "visual": visual, "router": router, "ratio": (base + extra) / base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=2048)
    args = p.parse_args()
    cases = {
        "Qwen1.5-7B (d 4096, ffn 11008, MHA), 729 image tokens, r 64": (4096, 4096, 11008, 729, 64),
        "GPU benchmark LLM (d 4096, ffn 11008, MHA), 64 image tokens, r 64": (4096, 4096, 11008, 64, 64),
        "benchmark LLM (d 512, ffn 1408, kv 256), 64 image tokens, r 64": (512, 256, 1408, 64, 64),
    }
    print(f"T = {args.seq} tokens, per decoder layer, forward GFLOPs")
    for name, (d, d_kv, ffn, n_img, r) in cases.items():
        f = layer_flops(d, d_kv, ffn, args.seq, n_img, r)
        print(f"- {name}: base {f['base'] / 1e9:.2f}, textual +{f['textual'] / 1e9:.2f}, "
              f"visual +{f['visual'] / 1e9:.2f}, router +{f['router'] / 1e9:.2f}  => ratio {f['ratio']:.3f}")


if __name__ == "__main__":
    main()
