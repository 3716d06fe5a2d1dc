"""Where a training step's time and memory go: the tensors autograd saves for backward, and the top kernels.

    python benchmarks/profile_train_step.py --mode wings                      # CPU, the small LLM
    python benchmarks/profile_train_step.py --mode llava --device cuda --hidden 4096 --layers 4 --heads 32 \\
        --kv-heads 32 --intermediate 11008 --batch 8 --seq 2048

Same model and batch as bench_train_step.py (bf16 autocast, fp32 master weights). The saved-tensor tally counts
every tensor handed to autograd, views included, so its total is an upper bound on activation memory.
"""

from __future__ import annotations

import argparse
import collections

import torch
from step_setup import add_shape_args, build
from torch.profiler import ProfilerActivity, profile

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.bool: 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="wings", choices=["wings", "llava"])
    add_shape_args(p, batch=2, seq=256)
    p.add_argument("--rows", type=int, default=25, help="profiler table rows")
    args = p.parse_args()

    model, _, batch = build(args, args.mode)
    device = torch.device(args.device)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(**batch).loss

    saved: collections.Counter = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(tuple(t.shape), t.dtype)] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    model.zero_grad(set_to_none=True)
    size = {key: torch.Size(key[0]).numel() * BYTES.get(key[1], 4) * n for key, n in saved.items()}
    print(f"{args.mode}, batch {args.batch} x {args.seq}: saved for backward {sum(size.values()) / 2**30:.2f} GiB")
    for (shape, dtype), nbytes in sorted(size.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {saved[(shape, dtype)]:4d} x {shape} {dtype}  {nbytes / 2**20:9.1f} MiB")

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        forward().backward()
        if cuda:
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=args.rows,
                                    max_name_column_width=60))


if __name__ == "__main__":
    main()
