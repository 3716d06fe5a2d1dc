"""The model and batch shared by bench_train_step.py and profile_train_step.py (imported as a sibling script)."""

from __future__ import annotations

import argparse

# Variants a benchmark can compare: "llava" (the baseline), "wings" (default kernels), and "wings+OPTION" with
# OPTION one or more of: eager (router_impl="eager", the reference that materialises probabilities), separate (the
# router summary in its own SDPA call instead of extra value channels of the main one), unfused (separate
# down-projections of the learners), recompute (learner activations recomputed in the backward),
# recompute-projections (the same, keeping the learners' attention outputs), masked (every
# learner query against every key under the mask, instead of the queries grouped by token kind).
VARIANT_OPTIONS = ("eager", "separate", "unfused", "recompute", "recompute-projections", "masked")
# Two more bases with the same backbone: "stock" is transformers' own LlavaForConditionalGeneration (the same
# vision tower, projector and LLM sizes) and "attached" is that model with `wings.attach` (options apply to it too).
BASES = ("llava", "wings", "stock", "attached")
IMAGE_AT = 8  # text tokens before each sample's image


def add_shape_args(p: argparse.ArgumentParser, batch: int, seq: int) -> None:
    """LLM shape, learner rank and device options (defaults: the small 512-wide LLM on the CPU)."""
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--router", default="position")
    p.add_argument("--router-impl", default="sdpa")
    p.add_argument("--image-size", type=int, default=64, help="SigLIP input side; image tokens = (side / patch)^2")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def image_tokens(args: argparse.Namespace) -> int:
    return (args.image_size // args.patch_size) ** 2


def build(args: argparse.Namespace, mode: str):
    """A random Wings (or llava-mode) model on `args.device` in train mode, its processor, and a batch:
    `args.batch` sequences of `args.seq` tokens, each with one image after an 8-token prefix."""
    import torch  # here, not at the top: bench_train_step's parent process only parses arguments

    from wings.builder import TinySpec, build_tiny, train_tiny_tokenizer

    torch.manual_seed(0)
    spec = TinySpec(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                    intermediate=args.intermediate, vocab=1000, max_positions=4096, tie_embeddings=False,
                    image_size=args.image_size, patch_size=args.patch_size, vision_hidden=192, vision_layers=2)
    base, *options = mode.split("+")
    unknown = [o for o in options if o not in VARIANT_OPTIONS]
    if base not in BASES or unknown:
        raise ValueError(f"unknown variant {mode!r}: use {', '.join(BASES)}, or wings/attached+OPTION with OPTION in "
                         f"{VARIANT_OPTIONS}")
    router = {"router_impl": "eager" if "eager" in options else args.router_impl, "router_max_positions": 4096}
    composed = "llava" if base in ("llava", "stock", "attached") else "wings"
    model, processor = build_tiny(spec, tokenizer=train_tiny_tokenizer(1000), mode=composed, rank=args.rank,
                                  router=args.router, **(router if composed == "wings" else {}))
    if base in ("stock", "attached"):
        model = stock_llava(model)
        if base == "attached":
            from wings.vlm import attach

            attach(model, rank=args.rank, router=args.router, **router)
    if base in ("wings", "attached"):
        set_kernel_options(model, options)
    device = torch.device(args.device)
    model.to(device).train()
    ids = torch.randint(10, 900, (args.batch, args.seq))
    ids[:, IMAGE_AT:IMAGE_AT + processor.image_seq_length] = processor.image_token_id
    batch = {"input_ids": ids.to(device),
             "pixel_values": torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)}
    batch["labels"] = batch["input_ids"]
    return model, processor, batch


def stock_llava(composed):
    """transformers' LlavaForConditionalGeneration with a composed model's vision tower, projector and LLM sizes
    (random weights: speed only)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=composed.config.vision_config.to_dict(),
                         text_config=composed.config.text_config.to_dict(),
                         image_token_id=composed.config.image_token_id,
                         vision_feature_layer=composed.config.vision_feature_layer,
                         vision_feature_select_strategy="full", image_seq_length=composed.config.image_seq_length)
    return LlavaForConditionalGeneration(config)


def set_kernel_options(model, options: list[str]) -> None:
    """Switch the model's runtime kernel choices (`model.wings_kernels`) to the reference paths named in options."""
    kernels = getattr(model, "wings_kernels", None)
    wanted = {"separate": ("fused_router", False), "unfused": ("fused_lowrank", False),
              "recompute": ("learner_recompute", True), "recompute-projections": ("learner_recompute", "projections"),
              "masked": ("grouped_learners", False)}
    for option in options:
        if option in wanted:
            if kernels is None:
                raise ValueError(f"variant option {option!r} needs a model with `wings_kernels`")
            setattr(kernels, *wanted[option])
