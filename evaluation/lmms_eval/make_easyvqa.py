"""Write easyvqa/easyvqa_test.jsonl, the data of the wings_easyvqa lmms-eval task, from the easy-vqa package:
a seeded sample of test questions, each with its 64x64 PNG inline (base64), so the task needs no other file.

    .venv/bin/python evaluation/lmms_eval/make_easyvqa.py [--size 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

from wings.atomic import write_text_atomic
from wings.data.easyvqa import eval_tasks

OUT = Path(__file__).resolve().parent / "easyvqa" / "easyvqa_test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=60, help="questions (a seeded sample of the test split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    lines = []
    for task in eval_tasks("test", size=args.size, seed=args.seed):
        image = base64.b64encode(Path(task["image"]).read_bytes()).decode()
        lines.append(json.dumps({"id": task["id"], "question": task["question"], "answer": task["answer"],
                                 "category": task["category"], "image": image}))
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} questions to {args.out}")


if __name__ == "__main__":
    main()
