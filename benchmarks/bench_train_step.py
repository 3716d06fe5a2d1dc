"""Forward+backward+AdamW step of a Wings model vs the same backbone in `llava` mode (same batch with images).

Each (mode, shape) runs in a fresh subprocess so that peak RSS is its own. Prints medians and ratios:

    python benchmarks/bench_train_step.py                 # default shapes (small: B4 x T256, long: B1 x T2048)
    python benchmarks/bench_train_step.py --hidden 1024   # wider LLM: learners are a smaller share
    python benchmarks/bench_train_step.py --device cuda --precision bf16 --hidden 2048 --layers 4

Memory: on CPU the process's peak RSS (ru_maxrss); on CUDA the peak of `torch.cuda.max_memory_allocated`.
Both include weights, gradients, AdamW state and activations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from step_setup import add_shape_args, build


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_one(args) -> dict:
    import torch

    model, _, batch = build(args, args.mode)
    device = torch.device(args.device)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = device.type == "cuda"
    # Mixed precision as the Trainer does it: fp32 master weights, bf16 autocast for the forward.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: allocates optimizer state and grads
    step()
    before = rss_kib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
        growth = peak_mib - torch.cuda.memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        growth = max(peak_mib - before / 1024, 0)
    return {"median_s": statistics.median(times), "peak_growth_mib": growth, "peak_mib": peak_mib,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def spawn(base_argv: list[str], **overrides) -> dict:
    argv = [sys.executable, __file__, "--child"] + base_argv
    for k, v in overrides.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="wings")
    add_shape_args(p, batch=4, seq=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--long-seq", type=int, default=2048)
    p.add_argument("--grad-ckpt", type=int, default=0, help="1: gradient checkpointing (as the released recipe)")
    p.add_argument("--only", choices=["small", "long"], help="run one shape only")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 weights")
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return
    common = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
              "--kv-heads", str(args.kv_heads), "--intermediate", str(args.intermediate), "--rank", str(args.rank),
              "--repeats", str(args.repeats), "--router", args.router, "--grad-ckpt", str(args.grad_ckpt),
              "--device", args.device, "--precision", args.precision]
    print(f"LLM hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, "
          f"ffn {args.intermediate}, learner rank {args.rank}, router {args.router}; SigLIP 64px/8 = 64 image tokens; "
          f"gradient checkpointing {'on' if args.grad_ckpt else 'off'}; {args.device}, {args.precision}")
    shapes = (("small", args.batch, args.seq), ("long", 1, args.long_seq))
    for label, batch, seq in (s for s in shapes if args.only in (None, s[0])):
        llava = spawn(common, mode="llava", batch=batch, seq=seq)
        wings = spawn(common, mode="wings", batch=batch, seq=seq, router_impl="sdpa")
        eager = spawn(common, mode="wings", batch=batch, seq=seq, router_impl="eager")
        print(f"\n[{label}] batch {batch} x {seq} tokens (params: llava {llava['params_m']:.2f}M, "
              f"wings {wings['params_m']:.2f}M)")
        print(f"  {'variant':<28}{'step s (median)':>16}{'time ratio':>12}{'step growth MiB':>17}{'peak MiB':>10}"
              f"{'mem ratio':>11}")
        for name, r in (("llava (baseline)", llava), ("wings, SDPA router", wings), ("wings, eager router", eager)):
            t_ratio = r["median_s"] / llava["median_s"]
            m_ratio = r["peak_mib"] / llava["peak_mib"]
            print(f"  {name:<28}{r['median_s']:>16.3f}{t_ratio:>12.2f}{r['peak_growth_mib']:>17.1f}"
                  f"{r['peak_mib']:>10.0f}{m_ratio:>11.2f}")
    what = "peak CUDA allocation" if args.device.startswith("cuda") else "peak process RSS"
    print(f"\nmem ratio = {what} / the baseline's (weights, gradients, optimizer state and activations).")


if __name__ == "__main__":
    main()
