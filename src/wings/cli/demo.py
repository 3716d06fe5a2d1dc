"""`wings demo [--quick] [--out DIR] [--seeds N]`: the embedded demo, offline: base LLM -> LLaVA and Wings MLLMs ->
accuracy, with the paper's stage-2 data mix (`--no-text-replay`: the image-only ablation)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny LLM, turn it into a LLaVA and a Wings MLLM, measure forgetting",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short run (minutes) used in the test suite")
    p.add_argument("--out", default="demo_out", help="output folder (models, data, logs, results.json, REPORT.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of the (first) run")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run the whole comparison for N seeds (seed, seed+1, ...) and report mean and range")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stage2-steps", type=int, default=None, metavar="N",
                   help="steps of both stage-2 runs; if not given, the mode's plan (1500 full, 600 quick)")
    p.add_argument("--text-replay", action=argparse.BooleanOptionalAction, default=True,
                   help="stage 2 mixes in text-only records as 6%% of its data, as the paper's LLaVA-665K does; "
                        "--no-text-replay trains stage 2 on image questions only (the ablation)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo.pipeline import run_demo, table
    from ..demo.seeds import run_seeds, seeds_table

    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.stage2_steps is not None and args.stage2_steps < 1:
        raise ValueError(f"--stage2-steps must be a positive number of steps, got {args.stage2_steps}")
    mode = "quick" if args.quick else "full"
    mix = "paper's mix: 6% text-only in stage 2" if args.text_replay else "image-only stage 2 (ablation)"
    print(f"wings demo: {mode} mode, {args.seeds} seed(s) from {args.seed}, {mix} -> {args.out} "
          f"(full logs in {args.out}/logs/)", flush=True)
    if args.seeds == 1:
        results = run_demo(args.out, mode=mode, seed=args.seed, progress=not args.no_progress,
                           stage2_steps=args.stage2_steps, text_replay=args.text_replay)
        print(table(results))
    else:
        summary = run_seeds(args.out, mode=mode, seeds=list(range(args.seed, args.seed + args.seeds)),
                            progress=not args.no_progress, stage2_steps=args.stage2_steps,
                            text_replay=args.text_replay)
        print(seeds_table(summary["summary"], args.seeds))
        print(f"total time {summary['timings']['total']:.0f} s (CPU time {summary['timings']['cpu_total']:.0f} s)")
    print(f"report: {args.out}/REPORT.md (results.json and plots beside it; full logs in {args.out}/logs/)")
    return 0
