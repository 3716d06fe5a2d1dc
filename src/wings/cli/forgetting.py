"""`wings forgetting`: text-only accuracy of the base LLM and each MLLM side by side (delta, retention, plot)."""

from __future__ import annotations

import argparse

from .args import check_device, positive_int, text


def register(sub) -> None:
    p = sub.add_parser("forgetting", help="text-only forgetting report: base LLM vs one or more MLLMs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="the base LLM directory (AutoModelForCausalLM + tokenizer), or the "
                                                 "stock VLM the models were built from (text-only prompts run "
                                                 "exactly as its own LLM)")
    p.add_argument("--model", action="append", required=True, help="an MLLM directory (repeatable)")
    p.add_argument("--label", action="append", default=None, type=text, help="one label per --model, in order")
    p.add_argument("--base-label", default=None, type=text, help="label of the base LLM (default: its directory name)")
    p.add_argument("--task", action="append", required=True, metavar="FILE.jsonl", help="text-only task (repeatable)")
    p.add_argument("--out", default="forgetting", help="output directory")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--length-normalised", action="store_true")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def _fmt(x, spec: str = ".3f", signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+{spec}}" if signed else f"{x:{spec}}"


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..evaluation.forgetting import run_forgetting

    check_device(args.device)
    report = run_forgetting(args.base, args.model, args.task, args.out, labels=args.label, base_label=args.base_label,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            length_normalised=args.length_normalised, device=args.device, dtype=args.dtype)
    table = Table(title="text-only forgetting (accuracy; delta vs base; retention = model / base)")
    table.add_column("task")
    table.add_column(f"{report['base']} (base)", justify="right")
    for label in report["models"]:
        table.add_column(label, justify="right")
    rows = list(report["tasks"].items())
    for task, row in rows:
        cells = [_fmt(row["base"]["accuracy"])]
        for label in report["models"]:
            m = row["models"][label]
            cells.append(f"{_fmt(m['accuracy'])} ({_fmt(m['delta'], signed=True)}, x{_fmt(m['retention'], '.2f')})")
        table.add_row(task, *cells)
    means = report["macro_mean"]
    cells = [_fmt(means[report["base"]]["accuracy"])]
    for label in report["models"]:
        m = means[label]
        cells.append(f"{_fmt(m['accuracy'])} ({_fmt(m['delta'], signed=True)}, x{_fmt(m['retention'], '.2f')})")
    table.add_row("macro mean", *cells, style="bold")
    Console().print(table)
    print(f"wrote {args.out}/forgetting.json and {report['plot']}")
    return 0
