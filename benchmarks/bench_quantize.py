"""Quantized weights (`--quantize int8|nf4`) against fp32 on saved models: greedy answers, task accuracy, memory,
decode speed.

    python benchmarks/bench_quantize.py DEMO_OUT/wings_stage2/final DEMO_OUT/llava_stage2/final \\
        --task DEMO_OUT/data/vqa_test.jsonl --task DEMO_OUT/data/text_heldout.jsonl --threads 1

Each (model, method) runs in a fresh process (spawn), so resident memory is that load's alone. Per run:
- accuracy on each task file, scored as `wings eval` scores it (wings.evaluation.runner, multiple choice by
  log-likelihood);
- greedy answers (`--answer-tokens` new tokens) to the first `--prompts` questions of every task, compared token
  for token with fp32's: the share that is identical;
- resident memory: RSS after loading minus RSS before (torch, transformers and bitsandbytes already imported), and
  the weights' own bytes (`get_memory_footprint`);
- decode tokens/s: `--speed-tokens` new tokens (no early stop) per prompt, batch 1, over `--speed-prompts` prompts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

METHODS = ("fp32", "int8", "nf4")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(model_dir: str, method: str, tasks: list[str], args: dict) -> dict:
    import torch

    torch.set_num_threads(args["threads"])
    from transformers.utils import logging as hf_logging

    from wings.evaluation.models import CHATML_TEMPLATE, EvalModel
    from wings.evaluation.runner import evaluate_task, load_tasks
    from wings.generation.chat import load_chat_model

    hf_logging.disable_progress_bar()
    loaded_tasks = load_tasks(tasks)
    from wings.quantization import backend_available

    if backend_available():  # its libraries (~45 MiB) in every run's baseline: the deltas are the models'
        import bitsandbytes  # noqa: F401
    before = rss_bytes()
    model, processor = load_chat_model(model_dir, device="cpu", dtype="float32",
                                       quantize=None if method == "fp32" else method)
    after = rss_bytes()
    em = EvalModel(model, processor.tokenizer, processor, processor.chat_template or CHATML_TEMPLATE,
                   Path(model_dir).name, Path(model_dir))
    out = {"model": model_dir, "method": method, "rss_mib": (after - before) / 2**20,
           "weights_mib": model.get_memory_footprint() / 2**20, "accuracy": {}, "answers": []}
    for task in loaded_tasks:
        result = evaluate_task(em, task, batch_size=args["batch_size"], progress=False).metrics()
        out["accuracy"][task.name] = result["accuracy"]
    items = [item for task in loaded_tasks for item in task.items[:args["prompts"]]]
    pad = em.pad_id
    timed_tokens, timed_seconds = 0, 0.0
    with torch.no_grad():
        for k, item in enumerate(items):
            prompt, _ = em.encode_item(item)
            batch = em.codec.batch([prompt], model.device)
            batch.pop("position_ids", None)
            n = batch["input_ids"].shape[1]
            ids = model.generate(**batch, max_new_tokens=args["answer_tokens"], do_sample=False, pad_token_id=pad)
            out["answers"].append(ids[0, n:].tolist())
            if k < args["speed_prompts"]:
                start = time.perf_counter()
                ids = model.generate(**batch, max_new_tokens=args["speed_tokens"],
                                     min_new_tokens=args["speed_tokens"], do_sample=False, pad_token_id=pad)
                timed_seconds += time.perf_counter() - start
                timed_tokens += ids.shape[1] - n
    out["tokens_per_s"] = timed_tokens / timed_seconds if timed_seconds else None
    return out


def _child(queue, *a) -> None:
    try:
        queue.put(run_one(*a))
    except Exception as err:  # reported by the parent, with the run it belongs to
        queue.put({"error": f"{type(err).__name__}: {err}"})


def in_fresh_process(*a) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *a))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{a[0]} {a[1]}: {result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model directories (composed Wings/LLaVA or stock VLM)")
    parser.add_argument("--task", action="append", required=True, help="a `wings eval` task file (repeatable)")
    parser.add_argument("--methods", default=",".join(METHODS), help="fp32 first: agreement is measured against it")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=50, help="questions per task for the greedy-answer agreement")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--speed-prompts", type=int, default=8)
    parser.add_argument("--speed-tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write every number here")
    ns = parser.parse_args()
    methods = ns.methods.split(",")
    if methods[0] != "fp32":
        parser.error("--methods must start with fp32 (the reference)")
    settings = {k: getattr(ns, k) for k in ("threads", "batch_size", "prompts", "answer_tokens", "speed_prompts",
                                            "speed_tokens")}
    rows = []
    for model_dir in ns.models:
        reference = None
        for method in methods:
            row = in_fresh_process(model_dir, method, ns.task, settings)
            reference = reference or row["answers"]
            row["agreement"] = sum(a == b for a, b in zip(row["answers"], reference, strict=True)) / len(reference)
            rows.append(row)
            acc = " ".join(f"{name} {value:.3f}" for name, value in row["accuracy"].items())
            print(f"{Path(model_dir).parent.name}/{Path(model_dir).name} {method:5s} agreement {row['agreement']:.3f} "
                  f"| {acc} | RSS +{row['rss_mib']:.1f} MiB, weights {row['weights_mib']:.2f} MiB "
                  f"| {row['tokens_per_s']:.1f} tok/s", flush=True)
    if ns.json:
        Path(ns.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
