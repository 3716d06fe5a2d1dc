"""`wings demo [--quick] [--out DIR]`: the embedded demo, offline: base LLM -> LLaVA and Wings MLLMs -> accuracy."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny LLM, turn it into a LLaVA and a Wings MLLM, measure forgetting",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short run (minutes) used in the test suite")
    p.add_argument("--out", default="demo_out", help="output folder (models, data, results.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stage2-steps", type=int, default=None, metavar="N",
                   help="steps of both stage-2 runs (default: the mode's plan, 1500 in full mode)")
    p.add_argument("--text-replay", action="store_true",
                   help="append the base LLM's text records to the stage-2 image questions (both recipes)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo.pipeline import run_demo, table

    results = run_demo(args.out, mode="quick" if args.quick else "full", seed=args.seed,
                       progress=not args.no_progress, stage2_steps=args.stage2_steps, text_replay=args.text_replay)
    print(table(results))
    print(f"results: {args.out}/results.json")
    return 0
