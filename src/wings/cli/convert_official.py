"""`wings convert-official SRC_DIR OUT_DIR --llm BASE_LLM_DIR --vision VISION_DIR`."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("convert-official", help="convert a released AIDC-AI/Wings checkpoint (compat=official)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", metavar="SRC_DIR", help="the released checkpoint (safetensors, sharded or not)")
    p.add_argument("out", metavar="OUT_DIR", help="where to write the converted model directory")
    p.add_argument("--llm", required=True, help="base LLM directory (config + tokenizer), e.g. Qwen1.5-7B-Chat")
    p.add_argument("--vision", required=True, help="vision encoder directory, e.g. siglip-so400m-patch14-384")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to save in (auto: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..convert import convert_official

    summary = convert_official(args.src, args.out, args.llm, args.vision, dtype=args.dtype, overwrite=args.overwrite)
    layout = summary["layout"]
    print(f"converted {summary['loaded']} tensors from {args.src} -> {args.out} "
          f"(learner layers {layout['learner_layers']}, rank {layout['rank']}, "
          f"router {'yes' if layout['has_router'] else 'no'}, {summary['dtype']})")
    if summary["kept_from_base"]:
        print(f"kept from --llm/--vision (absent from the release, unused by it): {len(summary['kept_from_base'])} "
              "tensors, see conversion.json")
    if summary["ignored_stage1_textual"]:
        print(f"ignored {summary['ignored_stage1_textual']} attn_t_pool tensors (stage-1 checkpoint: no router)")
    return 0
