"""`wings init-model`: compose a stage-0 model from an HF LLM + vision encoder, or build the tiny preset."""

from __future__ import annotations

import argparse
import re

from . import CLIError
from .args import positive_int

MAX_PROJECTOR_DEPTH = 8


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
    p.add_argument("--rank", type=positive_int, default=None, help="learner rank (default 64; 8 for --preset tiny)")
    p.add_argument("--router", default="position", choices=["position", "segment"])
    p.add_argument("--projector", default="mlp2x_gelu", type=projector_type,
                   help="linear, identity or mlpNx_gelu (N = 1..8 layers)")
    p.add_argument("--stage", type=int, default=2, choices=[1, 2],
                   help="1: visual learner only (alignment); 2: both learners and the router")
    p.add_argument("--image-pad-mode", default="pad", choices=["pad", "resize"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    p.set_defaults(func=run)


def projector_type(text: str) -> str:
    """linear | identity | mlpNx_gelu with a sane depth (a huge N would build millions of layers)."""
    match = re.fullmatch(r"mlp(\d+)x_gelu", text)
    if text in ("linear", "identity") or (match and 1 <= int(match.group(1)) <= MAX_PROJECTOR_DEPTH):
        return text
    raise argparse.ArgumentTypeError(f"must be linear, identity or mlpNx_gelu with N in 1..{MAX_PROJECTOR_DEPTH}, "
                                     f"got {text!r}")


def run(args) -> int:
    from ..builder import TinySpec, build_tiny, init_from_pretrained, save
    from ..paths import Output, check_output_dir, guard_outputs

    if args.preset and (args.llm or args.vision):
        raise CLIError("give either --preset tiny or --llm and --vision, not both")
    if not args.preset and not (args.llm and args.vision):
        raise CLIError("give --llm and --vision, or --preset tiny")
    # Before building anything: never over an input, never over an existing model without --overwrite.
    guard_outputs([Output("--out", args.out)], [("--llm", args.llm), ("--vision", args.vision)])
    check_output_dir(args.out, "--out", args.overwrite)
    stage_fields = {} if args.stage == 2 else {"use_textual_learner": False, "use_router": False}
    common = dict(mode=args.mode, router=args.router, projector=args.projector,
                  image_pad_mode=args.image_pad_mode, **stage_fields)
    if args.preset == "tiny":
        spec = TinySpec(llm=args.tiny_llm, vision=args.tiny_vision)
        model, processor = build_tiny(spec, rank=args.rank or 8, **common)
    else:
        model, processor = init_from_pretrained(args.llm, args.vision, rank=args.rank or 64, **common)
    out = save(model, processor, args.out, overwrite=args.overwrite)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.mode} model ({n_params / 1e6:.2f}M parameters) to {out}")
    return 0
