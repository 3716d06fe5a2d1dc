"""`wings iit build`: compose IIT-style interleaved dialogues (T, TT, TTT, TTV, TV, V); score them with `wings eval`."""

from __future__ import annotations

import argparse
from collections import Counter

from .args import positive_int


def register(sub) -> None:
    p = sub.add_parser("iit", help="IIT-style interleaved text/image benchmark (build; score with `wings eval`)")
    iit_sub = p.add_subparsers(dest="iit_command", required=True, metavar="ACTION")
    b = iit_sub.add_parser("build", help="compose multi-turn dialogues from a text pool and a multimodal pool",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--text-pool", required=True, help="text-only task JSONL (T turns)")
    b.add_argument("--mm-pool", required=True, help="task JSONL whose records have images (V turns)")
    b.add_argument("--configs", default="T,TT,TTT,TTV,TV,V", help="comma-separated turn patterns over T and V")
    b.add_argument("--per-config", type=positive_int, default=100, help="dialogues per configuration")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="output JSONL (image paths are written relative to it)")
    b.set_defaults(func=run_build)


def run_build(args) -> int:
    from ..evaluation.iit import build_iit_file

    records = build_iit_file(args.text_pool, args.mm_pool, args.configs, args.per_config, args.seed, args.out)
    counts = Counter(r["config"] for r in records)
    print(f"wrote {len(records)} dialogues to {args.out}: " + ", ".join(f"{c}={n}" for c, n in counts.items()))
    return 0
