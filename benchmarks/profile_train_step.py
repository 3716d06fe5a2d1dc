"""Where a training step's time and memory go: the tensors autograd saves for backward, and the top kernels.

    python benchmarks/profile_train_step.py --mode wings                      # CPU, the small LLM
    python benchmarks/profile_train_step.py --mode wings+recompute-projections --hidden 1024 --heads 8 \\
        --kv-heads 8 --intermediate 2752 --batch 2 --seq 2048 --image-size 384 --patch-size 16 --rows 0
    python benchmarks/profile_train_step.py --mode llava --device cuda --hidden 4096 --layers 4 --heads 32 \\
        --kv-heads 32 --intermediate 11008 --batch 8 --seq 2048

`--mode` is any variant of bench_train_step.py (llava, wings, wings+OPTION). Same model and batch (bf16 autocast,
fp32 master weights). The saved-tensor tally counts each storage autograd keeps once (views of one storage share
it), named by the source line that saved it first: the activation memory a step holds at the end of its forward.
A checkpointed region (learner recompute) saves only its inputs there; what a selective policy keeps besides is
not in this tally (bench_train_step.py --isolate measures the peak).
"""

from __future__ import annotations

import argparse
import collections
import traceback

import torch
from step_setup import add_shape_args, build
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="wings", help="llava, wings or wings+OPTION (step_setup.VARIANT_OPTIONS)")
    add_shape_args(p, batch=2, seq=256)
    p.add_argument("--rows", type=int, default=25, help="profiler table rows (0: no profile)")
    p.add_argument("--saved-rows", type=int, default=16, help="saved-tensor tally rows")
    args = p.parse_args()

    model, _, batch = build(args, args.mode)
    device = torch.device(args.device)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(**batch).loss

    storages: dict[int, int] = {}  # storage address -> bytes
    saved: collections.Counter = collections.Counter()  # (source line, shape, dtype) -> bytes of new storages

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = storage.nbytes()
            saved[(saving_line(), tuple(t.shape), t.dtype)] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    model.zero_grad(set_to_none=True)
    print(f"{args.mode}, batch {args.batch} x {args.seq}: saved for backward {sum(storages.values()) / 2**30:.3f} GiB "
          f"in {len(storages)} storages")
    for (line, shape, dtype), nbytes in sorted(saved.items(), key=lambda kv: -kv[1])[:args.saved_rows]:
        print(f"  {nbytes / 2**20:9.1f} MiB  {line:<28} {shape} {dtype}")

    if not args.rows:
        return
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        forward().backward()
        if cuda:
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=args.rows,
                                    max_name_column_width=60))


def saving_line() -> str:
    """file:line of the innermost wings or transformers frame that is saving a tensor."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/wings/" in frame.filename or "/transformers/" in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


if __name__ == "__main__":
    main()
