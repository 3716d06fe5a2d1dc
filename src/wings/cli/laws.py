"""`wings laws`: per-layer attention mass on text-before-image / image / text-after-image, and the attention shift."""

from __future__ import annotations

import argparse

from .args import check_device, positive_int


def register(sub) -> None:
    p = sub.add_parser("laws", help="MLLM-LAWS curves and the attention shift of a multimodal model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a Wings (or LLaVA-mode) model directory")
    p.add_argument("--data", required=True, help="task JSONL whose records each carry an image")
    p.add_argument("--out", default="laws", help="output directory (laws.json, laws.png)")
    p.add_argument("--max-items", type=positive_int, default=None)
    p.add_argument("--queries", default="all", choices=["all", "after"],
                   help="query tokens i summed: every token, or only the text after the image")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.io import write_json
    from ..evaluation.laws import compute_laws
    from ..evaluation.models import load_eval_model
    from ..evaluation.plots import laws_curves
    from ..evaluation.tasks import load_task
    from ..paths import Output, OutputError, expand, guard_outputs

    check_device(args.device)
    task = load_task(args.data)
    out = expand(args.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, expected a directory")
    guard_outputs([Output("--out", out, may_contain_inputs=True), Output("--out's laws.json", out / "laws.json"),
                   Output("--out's laws.png", out / "laws.png")],
                  [("MODEL_DIR", args.model_dir), ("--data", task.path)])
    em = load_eval_model(args.model_dir, device=args.device, dtype=args.dtype, what="MODEL_DIR", kind="mllm")
    result = compute_laws(em, task, queries=args.queries, batch_size=args.batch_size, max_items=args.max_items)
    shift = result["attention_shift"]
    title = f"{em.name}: LAWS over {result['n_used']} inputs, attention shift = " + (
        "n/a" if shift is None else f"{shift:.3f}")
    png = laws_curves(result["laws_mean"], out / "laws.png", title=title)
    write_json(out / "laws.json", {"model": str(em.path), "data": str(task.path), "plot": str(png), **result})
    print(title)
    print(f"wrote {out / 'laws.json'} and {png}")
    return 0
