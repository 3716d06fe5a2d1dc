"""`wings eval`: score a Wings/LLaVA MLLM or a plain HF causal LM on JSONL task files."""

from __future__ import annotations

import argparse

from . import CLIError
from .args import check_device, positive_int, text


def register(sub) -> None:
    p = sub.add_parser("eval", help="score a model on JSONL tasks (multiple choice and open questions)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a Wings model directory, or a plain HF causal LM directory (text-only tasks)")
    p.add_argument("--task", action="append", required=True, metavar="FILE.jsonl", help="task file (repeatable)")
    p.add_argument("--out", default="results.json", help="results JSON; predictions are written next to it")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--length-normalised", action="store_true",
                   help="headline multiple-choice accuracy uses log-likelihood per character of the option")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="generation budget for open questions")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--label", default=None, type=text,
                   help="name shown in tables and plots (default: the directory name)")
    p.set_defaults(func=run)


def settings_of(args) -> dict:
    return {"batch_size": args.batch_size, "length_normalised": args.length_normalised,
            "max_new_tokens": args.max_new_tokens, "dtype": args.dtype}


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..evaluation.models import load_eval_model, model_type_of
    from ..evaluation.runner import evaluate_task, load_tasks, result_paths, write_results
    from ..model_kinds import is_multimodal_type
    from ..paths import Output, check_output_file, guard_outputs

    check_device(args.device)
    tasks = load_tasks(args.task)  # validate every file before loading the model
    out = check_output_file(args.out, "--out")
    guard_outputs([Output("--out", p) for p in result_paths(out, tasks)],
                  [("MODEL_DIR", args.model_dir)] + [("--task", t.path) for t in tasks])
    with_images = [t.name for t in tasks if t.has_images]
    if with_images and not is_multimodal_type(model_type_of(args.model_dir, "MODEL_DIR")):  # before loading
        raise CLIError(f"MODEL_DIR {args.model_dir} is a text-only language model, but task(s) {with_images} have "
                       "images; score those with a Wings model or a stock VLM")
    em = load_eval_model(args.model_dir, device=args.device, dtype=args.dtype, label=args.label, what="MODEL_DIR")
    results = [evaluate_task(em, t, args.batch_size, args.max_new_tokens, args.length_normalised) for t in tasks]
    summary = write_results(em, results, args.out, settings_of(args))

    table = Table(title=f"{em.name} ({'length-normalised' if args.length_normalised else 'raw'} log-likelihood for MC)")
    for col in ("task", "n", "accuracy", "95% CI", "raw", "norm"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, m in summary["tasks"].items():
        rows = [(name, m)] + [(f"  {name}[{c}]", cm) for c, cm in m.get("per_config", {}).items()]
        for label, mm in rows:
            lo, hi = mm["ci95"]
            raw = m["raw"]["accuracy"] if label == name else None
            norm = m["norm"]["accuracy"] if label == name else None
            table.add_row(label, str(mm["n"]), f"{mm['accuracy']:.3f}", f"[{lo:.3f}, {hi:.3f}]",
                          "" if raw is None else f"{raw:.3f}", "" if norm is None else f"{norm:.3f}")
    Console().print(table)
    print(f"wrote {args.out}")
    return 0
