"""Forward+backward+AdamW step of a Wings model vs the same backbone in `llava` mode (same batch with images).

Default: every variant lives in ONE process and their steps are interleaved (llava, wings, llava, wings, ...),
so load from other processes on a shared machine hits them alike; the time ratio is the median of the per-round
ratios, printed beside the analytic FLOP ratio (flops.py) of the same shape. `--isolate` runs each variant in
its own process instead, which also gives its peak memory (process RSS on CPU, CUDA peak allocation on GPU).

    python benchmarks/bench_train_step.py                         # the small 512-wide LLM, B4 x 256
    python benchmarks/bench_train_step.py --hidden 2048 --heads 16 --kv-heads 16 --intermediate 5632 \\
        --seq 1039 --batch 1 --image-size 384 --patch-size 16     # width proxy: 576 image tokens
    python benchmarks/bench_train_step.py --variants llava,wings,wings+separate,wings+eager
    python benchmarks/bench_train_step.py --isolate --device cuda --precision bf16 --hidden 4096 --layers 4 \\
        --heads 32 --kv-heads 32 --intermediate 11008 --batch 8 --seq 2048

Variants: llava, wings, wings+OPTION[+OPTION] (see step_setup.VARIANT_OPTIONS); a trailing "+compile" runs that
variant under torch.compile (inductor), e.g. --variants llava,llava+compile,wings,wings+compile --warmup 3.
`stock` is transformers' LlavaForConditionalGeneration with the same sizes and `attached` that model with
`wings.attach`: --variants llava,wings,stock,attached prints attached/stock beside wings/llava.
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

from flops import model_flops
from step_setup import IMAGE_AT, add_shape_args, build, image_tokens


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def make_step(args, variant: str):
    """(step function, model): one forward + backward + AdamW step of `variant` on its batch."""
    import torch

    compiled = args.compile or variant.endswith("+compile")
    model, _, batch = build(args, variant.removesuffix("+compile"))
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device = torch.device(args.device)
    # Mixed precision as the Trainer does it: fp32 master weights, bf16 autocast for the forward.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if compiled:  # inductor; the first steps (warm-up) compile
        model = torch.compile(model)

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, model


def timed(step) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_interleaved(args, variants: list[str]) -> dict[str, dict]:
    """All variants in this process, one step each per round; returns per-variant wall/CPU times per round."""
    import torch

    steps = {}
    for v in variants:
        steps[v], model = make_step(args, v)
        for _ in range(args.warmup):  # allocates optimizer state and grads (and compiles, with --compile)
            steps[v]()
        steps[v + "/params"] = sum(p.numel() for p in model.parameters()) / 1e6
    times = {v: {"wall": [], "cpu": []} for v in variants}
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate who goes first
        for v in order:
            wall, cpu = timed(steps[v])
            times[v]["wall"].append(wall)
            times[v]["cpu"].append(cpu)
    for v in variants:
        times[v]["params_m"] = steps[v + "/params"]
    del steps
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return times


def run_one(args) -> dict:
    import torch

    step, model = make_step(args, args.mode)
    step()
    step()
    before = rss_kib()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [timed(step)[0] for _ in range(args.repeats)]
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
        growth = peak_mib - torch.cuda.memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        growth = max(peak_mib - before / 1024, 0)
    return {"median_s": statistics.median(times), "peak_growth_mib": growth, "peak_mib": peak_mib,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def spawn(argv: list[str], **overrides) -> dict:
    argv = [sys.executable, __file__, "--child"] + argv
    for k, v in overrides.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def analytic_ratio(args, variant: str) -> float:
    """Whole-model forward FLOP ratio of `variant` against llava for this shape (flops.model_flops)."""
    if variant.removesuffix("+compile") in ("llava", "stock"):
        return 1.0
    router = "separate" if ("+separate" in variant or "+eager" in variant) else "fused"
    head_dim = args.hidden // args.heads
    f = model_flops(args.hidden, args.kv_heads * head_dim, args.intermediate, args.layers, 1000, args.seq,
                    image_tokens(args), args.rank, 192, 2, router=router, head_dim=head_dim, prefix=IMAGE_AT)
    return f["ratio"]


def child_argv(args) -> list[str]:
    keys = ("batch", "seq", "hidden", "layers", "heads", "kv_heads", "intermediate", "rank", "router", "router_impl",
            "image_size", "patch_size", "device", "repeats", "grad_ckpt", "precision", "threads")
    argv = []
    for k in keys:
        argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return argv + (["--compile"] if args.compile else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="wings", help=argparse.SUPPRESS)
    add_shape_args(p, batch=4, seq=256)
    p.add_argument("--variants", default="llava,wings", help="comma-separated; the first is the baseline")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--isolate", action="store_true", help="one process per variant: also reports peak memory")
    p.add_argument("--grad-ckpt", type=int, default=0, help="1: gradient checkpointing (as the released recipe)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile(model) for every variant")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(args)))
        return
    variants = args.variants.split(",")
    n_img = image_tokens(args)
    print(f"LLM hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, "
          f"ffn {args.intermediate}, learner rank {args.rank}, router {args.router}; batch {args.batch} x {args.seq} "
          f"tokens, {n_img} image tokens each; gradient checkpointing {'on' if args.grad_ckpt else 'off'}; "
          f"{args.device}, {args.precision}{', compiled' if args.compile else ''}, "
          f"{'one process per variant' if args.isolate else 'variants interleaved in one process'}")
    if args.isolate:
        results = {v: spawn(child_argv(args), mode=v) for v in variants}
        base = results[variants[0]]
        print(f"  {'variant':<26}{'step s':>9}{'time ratio':>12}{'analytic':>10}{'meas/anal':>11}"
              f"{'peak MiB':>10}{'mem ratio':>11}")
        for v, r in results.items():
            t_ratio, a_ratio = r["median_s"] / base["median_s"], analytic_ratio(args, v)
            print(f"  {v:<26}{r['median_s']:>9.3f}{t_ratio:>12.3f}{a_ratio:>10.3f}{t_ratio / a_ratio:>11.3f}"
                  f"{r['peak_mib']:>10.0f}{r['peak_mib'] / base['peak_mib']:>11.2f}")
        what = "peak CUDA allocation" if args.device.startswith("cuda") else "peak process RSS"
        print(f"\nmem ratio = {what} / the baseline's (weights, gradients, optimizer state and activations).")
        return
    import torch

    print(f"torch threads {torch.get_num_threads()}, {args.repeats} interleaved rounds")
    times = run_interleaved(args, variants)
    base = times[variants[0]]
    print(f"  {'variant':<26}{'params M':>9}{'step s':>9}{'ratio (wall)':>14}{'ratio (CPU)':>13}{'analytic':>10}"
          f"{'meas/anal':>11}")
    for v in variants:
        t = times[v]
        ratio = statistics.median(a / b for a, b in zip(t["wall"], base["wall"], strict=True))
        ratio_cpu = statistics.median(a / b for a, b in zip(t["cpu"], base["cpu"], strict=True))
        a_ratio = analytic_ratio(args, v)
        print(f"  {v:<26}{t['params_m']:>9.1f}{statistics.median(t['wall']):>9.3f}{ratio:>14.3f}{ratio_cpu:>13.3f}"
              f"{a_ratio:>10.3f}{ratio / a_ratio:>11.3f}")
    pairs = [("wings", "llava"), ("attached", "stock")]
    if all(v in times for pair in pairs for v in pair):
        ratios = [statistics.median(a / b for a, b in zip(times[x]["wall"], times[y]["wall"], strict=True))
                  for x, y in pairs]
        print(f"\nWings on a stock LLaVA vs our composed Wings: attached/stock {ratios[1]:.3f}, wings/llava "
              f"{ratios[0]:.3f}; they differ by {abs(ratios[1] / ratios[0] - 1):.1%} (target: within 5%)")
    print("\nratio = median over rounds of (variant step / baseline step in the same round); analytic = forward FLOPs"
          " of the whole model (layers, LM head, vision) / the baseline's, for the router path the variant runs "
          "(fused value channels unless +separate/+eager).")


if __name__ == "__main__":
    main()
