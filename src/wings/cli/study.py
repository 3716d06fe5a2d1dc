"""`wings study [--quick] [--out DIR] [--seeds N] [--variants a,b,...]`: Wings beside the baselines and its own
ablations on the demo's task, over seeds: table, results.json, plots and the claim-by-claim report."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("study", help="Wings vs. replay, frozen LLM, LoRA, interpolation and its own ablations "
                                     "(the demo's task, several seeds)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the test suite's scale (minutes; too short to compare)")
    p.add_argument("--out", default="study_out", help="output folder (seed-N/, results.json, table.md, REPORT.md, "
                                                      "tradeoff.png, router.png)")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds seed, seed+1, ..., seed+N-1")
    p.add_argument("--variants", default="all", metavar="A,B,...",
                   help="which variants to run (see `docs/STUDY.md`); `interp` needs `llava`, added if missing")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads (1 is faster than 2 when other jobs share the cores)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train N variants at a time, each in its own process with 1 torch thread")
    p.add_argument("--resume", action="store_true",
                   help="keep what an earlier run with the same plan finished in --out (shared stages, variants)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite results.json, table.md, REPORT.md and the plots from the seed-N/ "
                        "results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo.variants import parse_variants

    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    names = parse_variants(args.variants)
    import torch

    from ..demo.study import run_study

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    seeds = list(range(args.seed, args.seed + args.seeds))
    if args.report_only:
        from ..demo.study import rebuild_report

        results = rebuild_report(args.out)
    else:
        print(f"wings study: {mode} mode, seeds {seeds[0]}..{seeds[-1]}, {len(names)} variants -> {args.out} "
              f"(full logs in {args.out}/seed-N/logs/)", flush=True)
        results = run_study(args.out, mode=mode, seeds=seeds, variants=names, progress=not args.no_progress,
                            resume=args.resume, workers=args.workers)
    print(results["table"])
    for claim in results["claims"]:
        print(f"- {claim['claim']}: {claim['verdict']} ({claim['figure']})")
    t = results["timings"]
    cpu = "the runs' CPU time not recorded" if t.get("cpu_total") is None else f"CPU time {t['cpu_total']:.0f} s"
    print(f"total time {t['total']:.0f} s (per seed {', '.join(f'{s:.0f}' for s in t['per_seed'])} s; {cpu}; "
          f"{t['threads']} thread(s), {t.get('workers', 1)} worker(s))")
    print(f"report: {args.out}/REPORT.md (results.json, table.md, tradeoff.png, router.png beside it)")
    return 0
