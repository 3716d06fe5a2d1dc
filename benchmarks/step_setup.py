"""The model and batch shared by bench_train_step.py and profile_train_step.py (imported as a sibling script)."""

from __future__ import annotations

import argparse


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
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def build(args: argparse.Namespace, mode: str):
    """A random Wings (or llava-mode) model on `args.device` in train mode, its processor, and a batch:
    `args.batch` sequences of `args.seq` tokens, each with one 64x64 image (64 tokens) after an 8-token prefix."""
    import torch  # here, not at the top: bench_train_step's parent process only parses arguments

    from wings.builder import TinySpec, build_tiny, train_tiny_tokenizer

    torch.manual_seed(0)
    spec = TinySpec(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                    intermediate=args.intermediate, vocab=1000, max_positions=4096, tie_embeddings=False,
                    image_size=64, patch_size=8, vision_hidden=192, vision_layers=2)
    extra = {} if mode == "llava" else {"router_impl": args.router_impl, "router_max_positions": 4096}
    model, processor = build_tiny(spec, tokenizer=train_tiny_tokenizer(1000), mode=mode, rank=args.rank,
                                  router=args.router, **extra)
    device = torch.device(args.device)
    model.to(device).train()
    ids = torch.randint(10, 900, (args.batch, args.seq))
    ids[:, 8:8 + processor.image_seq_length] = processor.image_token_id
    batch = {"input_ids": ids.to(device), "pixel_values": torch.randn(args.batch, 3, 64, 64, device=device)}
    batch["labels"] = batch["input_ids"]
    return model, processor, batch
