"""Analytic forward FLOPs of a Wings model against the same backbone in llava mode (the benchmarks' yardstick).

    python benchmarks/flops.py                 # per decoder layer, Qwen1.5-7B-like and the benchmark shapes
    python benchmarks/flops.py --seq 1039 --image-tokens 576 --hidden 2048 --heads 16 --kv-heads 16 --ffn 5632
    (with --hidden: also the bytes a decoding step moves at that shape, --seq cached keys)

Counts multiply-adds x2 for matmuls; attention counts the (query, key) pairs its mask lets through: the causal
half for the main attention; for the learners, the layout the benchmarks use (`prefix` text tokens, one image, the
rest text): the textual learner's text queries see the text up to themselves and its image queries the prefix, the
visual learner's image queries see the image up to themselves and the text after it sees the whole image.
(`prefix=None`: the earlier, looser count, every query against every image key and the causal half of T x text.)
Backward costs ~2x forward for both models, so the forward ratio is also the training-step ratio. The router's
summary costs one more causal attention pass when it runs as its own SDPA call (`router="separate"`), or only
its extra value channels when it rides in the main attention call (`router="fused"`: Q, K, V padded from
head_dim to head_dim + pad). Elementwise work, copies and casts are not FLOPs and are not counted: the measured
ratio divided by this one is the overhead the kernels add beyond arithmetic.
"""

from __future__ import annotations

import argparse


def layer_flops(d: int, d_kv: int, ffn: int, T: int, n_image: int, rank: int, router: str | None = "separate",
                head_dim: int = 128, pad: int = 8, prefix: int | None = 8) -> dict:
    """Forward FLOPs of one decoder layer on one sequence of T tokens, n_image of them image tokens after `prefix`
    text tokens."""
    n_image = min(n_image, T)
    text = T - n_image
    base_proj = 2 * T * (2 * d * d + 2 * d * d_kv)  # q, o full width; k, v at kv width
    base_attn = 2 * 2 * (T * T / 2) * d  # QK^T and PV over the causal half
    base_mlp = 2 * T * 3 * d * ffn
    base = base_proj + base_attn + base_mlp
    low_rank = lambda n: 2 * n * 2 * d * rank  # noqa: E731  (down + up on n tokens)
    if prefix is None:  # the loose count
        textual_pairs, visual_pairs = T * text / 2, T * n_image
    else:
        prefix = min(prefix, text)
        textual_pairs = text * text / 2 + n_image * prefix
        visual_pairs = n_image * n_image / 2 + (text - prefix) * n_image
    textual = 2 * low_rank(T) + 2 * low_rank(text) + 2 * 2 * textual_pairs * d  # q,o on queries; k,v on keys
    visual = 2 * low_rank(T) + 2 * low_rank(n_image) + 2 * 2 * visual_pairs * d
    if router is None:
        routing = 0.0
    elif router == "fused":  # the main attention's Q, K, V widen from head_dim to head_dim + pad
        routing = base_attn * pad / head_dim
    else:  # one more attention pass (values padded to head_dim)
        routing = base_attn
    extra = textual + visual + routing
    return {"base": base, "textual": textual, "visual": visual, "router": routing, "ratio": (base + extra) / base}


def model_flops(d: int, d_kv: int, ffn: int, layers: int, vocab: int, T: int, n_image: int, rank: int,
                vision_d: int, vision_layers: int, router: str | None = "separate", head_dim: int = 128,
                pad: int = 8, wings_layers: int | None = None, prefix: int | None = 8) -> dict:
    """Forward FLOPs of the whole model on one sequence (decoder layers, LM head, vision tower, projector).

    The vision tower (d_ff = 2 d, full attention over its patches) and the head are the same in both models, so
    they pull the whole-model ratio towards 1: this is the ratio a training-step benchmark should be held to."""
    per_layer = layer_flops(d, d_kv, ffn, T, n_image, rank, router, head_dim, pad, prefix)
    wings_layers = layers if wings_layers is None else wings_layers
    vision = vision_layers * (2 * n_image * (4 * vision_d * vision_d + 2 * 2 * vision_d * vision_d)
                              + 2 * 2 * n_image * n_image * vision_d)
    common = 2 * T * d * vocab + vision + 2 * n_image * (vision_d * d + d * d)
    base = layers * per_layer["base"] + common
    extra = wings_layers * (per_layer["textual"] + per_layer["visual"] + per_layer["router"])
    return {"base": base, "wings": base + extra, "ratio": (base + extra) / base, "layer_ratio": per_layer["ratio"]}


def decode_bytes(d: int, d_kv: int, ffn: int, batch: int, keys: int, n_image: int, rank: int,
                 cat_cache: bool = True) -> dict:
    """Bytes one decoding step reads (and the stock cache copies) per decoder layer, fp32: the yardstick for
    decode, which is bound by memory traffic rather than FLOPs. `keys`: KV-cache length; `n_image`: image keys of
    the visual learner per sample. HF's DynamicCache re-concatenates its whole KV cache at every step
    (`cat_cache`: read + write), in both models; the learner cache appends in place."""
    weights = 4 * (2 * d * d + 2 * d * d_kv + 3 * d * ffn)
    kv = 4 * batch * keys * 2 * d_kv
    base = weights + kv * (3 if cat_cache else 1)
    learners = 4 * 6 * 2 * d * rank  # low-rank weights read: q, o of both learners, k, v of the textual one
    text_keys = keys - n_image
    extra = learners + 4 * batch * 2 * d * (n_image + text_keys)  # visual + textual keys and values, full width
    return {"base": base, "wings": base + extra, "ratio": base / (base + extra)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--image-tokens", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--prefix", type=int, default=8, help="text tokens before the image (-1: the loose count)")
    args = p.parse_args()
    prefix = None if args.prefix < 0 else args.prefix
    cases = {
        "Qwen1.5-7B (d 4096, ffn 11008, MHA), 729 image tokens, r 64": (4096, 4096, 11008, 729, 64, 128),
        "GPU benchmark LLM (d 4096, ffn 11008, MHA), 64 image tokens, r 64": (4096, 4096, 11008, 64, 64, 128),
        "CPU width benchmark (d 2048, ffn 5632, MHA), 576 image tokens, r 64": (2048, 2048, 5632, 576, 64, 128),
        "benchmark LLM (d 512, ffn 1408, kv 256), 64 image tokens, r 64": (512, 256, 1408, 64, 64, 64),
    }
    if args.hidden:
        hd = args.hidden // args.heads
        cases = {"given shape": (args.hidden, args.kv_heads * hd, args.ffn, args.image_tokens or 0, args.rank, hd)}
    print(f"T = {args.seq} tokens, per decoder layer, forward GFLOPs")
    if args.hidden:
        for batch in (1, 8):
            b = decode_bytes(args.hidden, args.kv_heads * (args.hidden // args.heads), args.ffn, batch, args.seq,
                             args.image_tokens or 0, args.rank)
            print(f"- decode, batch {batch}, {args.seq} cached keys: {b['base'] / 2**20:.0f} MiB per layer and step "
                  f"(llava), +{(b['wings'] - b['base']) / 2**20:.0f} MiB (wings)  => llava/wings {b['ratio']:.3f}")
    for name, (d, d_kv, ffn, n_img, r, hd) in cases.items():
        for router in ("separate", "fused"):
            f = layer_flops(d, d_kv, ffn, args.seq, n_img, r, router=router, head_dim=hd, prefix=prefix)
            print(f"- {name}, router {router}: base {f['base'] / 1e9:.2f}, textual +{f['textual'] / 1e9:.2f}, "
                  f"visual +{f['visual'] / 1e9:.2f}, router +{f['router'] / 1e9:.2f}  => ratio {f['ratio']:.3f}")


if __name__ == "__main__":
    main()
