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
from torch.profiler import ProfilerActivity, profile

from wings.builder import TinySpec, build_tiny, train_tiny_tokenizer

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.bool: 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="wings", choices=["wings", "llava"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--rows", type=int, default=25, help="profiler table rows")
    args = p.parse_args()

    torch.manual_seed(0)
    spec = TinySpec(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                    intermediate=args.intermediate, vocab=1000, max_positions=4096, tie_embeddings=False,
                    image_size=64, patch_size=8, vision_hidden=192, vision_layers=2)
    extra = {} if args.mode == "llava" else {"router_impl": "sdpa", "router_max_positions": 4096}
    model, processor = build_tiny(spec, tokenizer=train_tiny_tokenizer(1000), mode=args.mode, rank=args.rank,
                                  **extra)
    device = torch.device(args.device)
    model.to(device).train()
    ids = torch.randint(10, 900, (args.batch, args.seq))
    ids[:, 8:8 + processor.image_seq_length] = processor.image_token_id
    ids, pixels = ids.to(device), torch.randn(args.batch, 3, 64, 64, device=device)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(input_ids=ids, pixel_values=pixels, labels=ids).loss

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
