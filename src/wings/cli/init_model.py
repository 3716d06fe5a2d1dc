"""`wings init-model`: compose a stage-0 model from an HF LLM + vision encoder, or build the tiny preset."""

from __future__ import annotations

import argparse

from . import CLIError


def register(sub) -> None:
    p = sub.add_parser("init-model", help="compose a stage-0 Wings/LLaVA model directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--llm", help="HF causal LM directory (or hub id) with its tokenizer")
    p.add_argument("--vision", help="HF vision encoder directory (or hub id) with its image processor")
    p.add_argument("--preset", choices=["tiny"], help="build a tiny random model offline instead")
    p.add_argument("--tiny-llm", default="qwen2", choices=["qwen2", "llama", "mistral", "qwen3"])
    p.add_argument("--tiny-vision", default="siglip", choices=["siglip", "clip"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", default="wings", choices=["wings", "llava"])
    p.add_argument("--rank", type=int, default=None, help="learner rank (default 64; 8 for --preset tiny)")
    p.add_argument("--router", default="position", choices=["position", "segment"])
    p.add_argument("--projector", default="mlp2x_gelu")
    p.add_argument("--stage", type=int, default=2, choices=[1, 2],
                   help="1: visual learner only (alignment); 2: both learners and the router")
    p.add_argument("--image-pad-mode", default="pad", choices=["pad", "resize"])
    p.set_defaults(func=run)


def run(args) -> int:
    from ..builder import TinySpec, build_tiny, init_from_pretrained, save

    stage_fields = {} if args.stage == 2 else {"use_textual_learner": False, "use_router": False}
    common = dict(mode=args.mode, router=args.router, projector=args.projector,
                  image_pad_mode=args.image_pad_mode, **stage_fields)
    if args.preset == "tiny":
        spec = TinySpec(llm=args.tiny_llm, vision=args.tiny_vision)
        model, processor = build_tiny(spec, rank=args.rank or 8, **common)
    elif args.llm and args.vision:
        model, processor = init_from_pretrained(args.llm, args.vision, rank=args.rank or 64, **common)
    else:
        raise CLIError("give --llm and --vision, or --preset tiny")
    out = save(model, processor, args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.mode} model ({n_params / 1e6:.2f}M parameters) to {out}")
    return 0
