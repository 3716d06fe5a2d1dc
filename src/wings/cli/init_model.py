"""`wings init-model`: compose a stage-0 model from an HF LLM + vision encoder, attach Wings to a stock VLM, or
build a tiny preset."""

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
    p.add_argument("--vlm", help="a stock transformers VLM directory (or hub id): attach Wings to it instead "
                                 "(Llava family, Qwen2/2.5/3-VL, Idefics3, SmolVLM, InternVL; docs/ADAPT.md)")
    p.add_argument("--preset", choices=["tiny"], help="build a tiny random model offline instead")
    p.add_argument("--tiny-vlm", metavar="FAMILY", help="with --preset tiny: a tiny random stock VLM of this family "
                                                        "(e.g. qwen2_vl) with Wings attached")
    p.add_argument("--tiny-llm", default="qwen2", choices=["qwen2", "llama", "mistral", "qwen3"])
    p.add_argument("--tiny-vision", default="siglip", choices=["siglip", "clip"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", default="wings", choices=["wings", "llava"])
    p.add_argument("--rank", type=positive_int, default=None, help="learner rank (default 64; 8 for --preset tiny)")
    p.add_argument("--router", default=None, choices=["position", "segment"],
                   help="router type (default: position, the released model's; segment with --vlm / --tiny-vlm)")
    p.add_argument("--layers", type=layer_list, default=None,
                   help="decoder layers that get learners, e.g. 0,2,4 (default: all)")
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


def layer_list(text: str) -> list[int]:
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated layer numbers, got {text!r}") from None
    if not layers or layers[0] < 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated layer numbers >= 0, got {text!r}")
    return layers


def run(args) -> int:
    from ..builder import TinySpec, build_tiny, init_from_pretrained, save
    from ..paths import Output, check_output_dir, guard_outputs

    if args.vlm or args.tiny_vlm:
        return run_vlm(args)
    if args.preset and (args.llm or args.vision):
        raise CLIError("give either --preset tiny or --llm and --vision, not both")
    if not args.preset and not (args.llm and args.vision):
        raise CLIError("give --llm and --vision, or --preset tiny")
    # Before building anything: never over an input, never over an existing model without --overwrite.
    guard_outputs([Output("--out", args.out)], [("--llm", args.llm), ("--vision", args.vision)])
    check_output_dir(args.out, "--out", args.overwrite)
    stage_fields = {} if args.stage == 2 else {"use_textual_learner": False, "use_router": False}
    if args.layers is not None:
        stage_fields["learner_layers"] = args.layers
    common = dict(mode=args.mode, router=args.router or "position", projector=args.projector,
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


def run_vlm(args) -> int:
    """--vlm SRC (or --preset tiny --tiny-vlm FAMILY): a stock VLM with fresh Wings parts, saved as a full directory
    (stock weight names, plus the learners) with the stock processor."""
    from ..builder import save
    from ..paths import Output, check_output_dir, guard_outputs

    composed = [flag for flag, value in (("--llm", args.llm), ("--vision", args.vision)) if value]
    if composed:
        raise CLIError(f"{' and '.join(composed)} compose a new model; --vlm attaches Wings to a stock one: give one")
    if args.tiny_vlm and args.preset != "tiny":
        raise CLIError("--tiny-vlm needs --preset tiny")
    if args.vlm and args.preset:
        raise CLIError("give either --vlm or --preset tiny --tiny-vlm FAMILY, not both")
    if args.mode == "llava":
        raise CLIError("a stock VLM is already the LLaVA-style baseline; train it as it is with "
                       "`wings train llava_stage2 --model SRC` (--mode llava is for composed models)")
    guard_outputs([Output("--out", args.out)], [("--vlm", args.vlm)])
    check_output_dir(args.out, "--out", args.overwrite)
    if args.tiny_vlm:
        from ..vlm.registry import arch_for
        from ..vlm.tiny import build_tiny_vlm

        arch_for(args.tiny_vlm)  # an unknown family is refused, naming the supported ones
        model, processor = build_tiny_vlm(args.tiny_vlm)
        source = f"a tiny random {args.tiny_vlm}"
    else:
        model, processor = load_stock_vlm(args.vlm)
        source = args.vlm
    from ..vlm import attach

    attach(model, rank=args.rank or (8 if args.tiny_vlm else 64), router=args.router or "segment",
           layers=args.layers, stage=args.stage)
    out = save(model, processor, args.out, overwrite=args.overwrite)
    learners = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n and (
        ".visual." in n or ".textual." in n or ".router." in n))
    total = sum(p.numel() for p in model.parameters())
    print(f"wrote {type(model).__name__} ({total / 1e6:.2f}M parameters, {learners / 1e6:.3f}M of them Wings "
          f"stage-{args.stage} parts) from {source} to {out}")
    return 0


def load_stock_vlm(source: str):
    """(stock model in float32, its processor), checked: a supported type, a processor that fits the model."""
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..model_dir import check_model_dir
    from ..vlm.processor import check_fits, load_processor
    from ..vlm.registry import arch_for, visual_token_ids

    if Path(source).expanduser().exists():
        check_model_dir(Path(source).expanduser(), "--vlm", kind="vlm")
    config = AutoConfig.from_pretrained(source)
    arch = arch_for(config.model_type)
    processor = load_processor(source)  # checked before the weights are read
    check_fits(processor, visual_token_ids(config, arch), config.get_text_config().vocab_size,
               where=f"--vlm {source}: the processor")
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    return model.eval(), processor
