"""Decode speed of a Wings model with and without the KV (+ learner) cache, and against HF's own LLaVA.

One image per prompt + a question, greedy, EOS suppressed, `--batch` prompts at once (each its own easy-vqa
image). Every model has the same backbone sizes; HF `LlavaForConditionalGeneration` is the baseline. Decode
tokens/s per sequence = (n - 1) / (t(n new tokens) - t(1 new token)), so the prompt's prefill cancels out.
Wings and LLaVA runs are interleaved in one process, and the Wings/LLaVA ratio is the median of the per-round
ratios; "per CPU-second" divides by this process's CPU time, the steadier figure on a shared machine.

    python benchmarks/bench_generate.py                          # tiny width (hidden 256, 64 image tokens)
    python benchmarks/bench_generate.py --hidden 2048 --layers 2 --heads 16 --kv-heads 16 --intermediate 5632 \\
        --image-size 384 --patch-size 16 --new-tokens 64 --uncached-tokens 4 [--batch 8]
    python benchmarks/bench_generate.py --cache-impl static [--compile]   # pre-allocated caches (compiled forward)
"""

from __future__ import annotations

import argparse
import statistics
import time

import easy_vqa
import torch
from PIL import Image
from transformers import CompileConfig, LlavaConfig, LlavaForConditionalGeneration

from wings.builder import TinySpec, build_tiny


def randomize_learners(model: torch.nn.Module, std: float = 0.05) -> None:
    """Non-zero learners and router, so the Wings path does its full work (fresh ones are exact no-ops)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".visual." in name or ".textual." in name or ".router." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def hf_llava(model) -> LlavaForConditionalGeneration:
    """HF's LLaVA with the same vision/text configs (random weights: speed only)."""
    config = LlavaConfig(vision_config=model.config.vision_config.to_dict(),
                         text_config=model.config.text_config.to_dict(), image_token_id=model.config.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="full",
                         image_seq_length=model.config.image_seq_length)
    return LlavaForConditionalGeneration(config).eval()


class Run:
    """One model's generate() settings."""

    def __init__(self, model, use_cache: bool = True, cache_impl: str | None = None, compile_forward: bool = False):
        self.model, self.use_cache, self.kwargs = model, use_cache, {}
        if cache_impl is not None:
            self.kwargs["cache_implementation"] = cache_impl
        if compile_forward:  # generate compiles the decode step itself on GPUs; on CPU it must be told to
            config = CompileConfig(fullgraph=False, mode="default")
            config._compile_all_devices = True
            self.kwargs["compile_config"] = config
        elif cache_impl == "static":
            self.kwargs["disable_compile"] = True

    def __call__(self, batch, new_tokens: int) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds)."""
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      use_cache=self.use_cache, **self.kwargs)
        if out.is_cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
        return wall, cpu


def decode_rates(runs: dict[str, Run], batch, new_tokens: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Per round, decode tokens/s per sequence (wall, CPU) of every run, prefill subtracted; the runs are
    interleaved per round (alternating order) so that load from other processes hits them alike."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for run in runs.values():
        run(batch, min(4, new_tokens))  # warm-up (and compilation)
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            first = runs[name](batch, 1)
            full = runs[name](batch, new_tokens)
            samples[name].append(tuple((new_tokens - 1) / (f - s) for f, s in zip(full, first, strict=True)))
    return samples


def median_of(samples: list[tuple[float, float]], i: int) -> float:
    return statistics.median(s[i] for s in samples)


def ratio_of(a: list[tuple[float, float]], b: list[tuple[float, float]], i: int) -> float:
    return statistics.median(x[i] / y[i] for x, y in zip(a, b, strict=True))


def make_batch(processor, batch_size: int, device: str):
    paths = easy_vqa.get_test_image_paths()
    images = [Image.open(paths[i]).convert("RGB") for i in range(batch_size)]
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat shape is in the image?"}],
                                           add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt] * batch_size, images=images).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=64, help="SigLIP input side; image tokens = (side/patch)^2")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--uncached-tokens", type=int, default=0, help="new tokens of the slow no-cache run "
                        "(0: --new-tokens; a few suffice at width, where each step recomputes the whole prompt)")
    parser.add_argument("--uncached-repeats", type=int, default=1, help="the slow no-cache run")
    parser.add_argument("--cache-impl", default=None, choices=[None, "dynamic", "static"],
                        help="generate's cache_implementation for both models (default: dynamic)")
    parser.add_argument("--compile", action="store_true", help="with --cache-impl static: compiled decode step")
    # One thread by default: with 2 threads on a busy 2-core machine, OpenMP barriers made timings swing 5x.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = TinySpec(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                    intermediate=args.intermediate, vocab=1000, image_size=args.image_size,
                    patch_size=args.patch_size, vision_hidden=192, vision_layers=4, max_positions=4096,
                    tie_embeddings=True)
    model, processor = build_tiny(spec, rank=64)
    randomize_learners(model)
    model.to(args.device).eval()
    llava = hf_llava(model).to(args.device)
    batch = make_batch(processor, args.batch, args.device)
    n = args.new_tokens
    print(f"batch {args.batch} x prompt {batch['input_ids'].shape[1]} tokens ({model.config.image_seq_length} image), "
          f"{n} new tokens; LLM hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, ffn "
          f"{args.intermediate}; {args.device}, {torch.get_num_threads()} threads, cache {args.cache_impl or 'dynamic'}"
          f"{', compiled decode step' if args.compile else ''}; "
          f"wings params {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
    fast = decode_rates({"wings": Run(model, True, args.cache_impl, args.compile),
                         "llava": Run(llava, True, args.cache_impl, args.compile)}, batch, n, args.repeats)
    slow = decode_rates({"wings_no_cache": Run(model, False)}, batch, args.uncached_tokens or n,
                        args.uncached_repeats)
    wings, llava_s, uncached = fast["wings"], fast["llava"], slow["wings_no_cache"]
    print("decode tok/s per sequence   wall    (per CPU-second)   [medians over rounds]")
    print(f"wings, cache      : {median_of(wings, 0):8.2f}  ({median_of(wings, 1):8.2f})")
    print(f"wings, no cache   : {median_of(uncached, 0):8.2f}  ({median_of(uncached, 1):8.2f})   cache speed-up "
          f"{median_of(wings, 0) / median_of(uncached, 0):.1f}x ({median_of(wings, 1) / median_of(uncached, 1):.1f}x)"
          ", target >= 10x")
    print(f"HF llava, cache   : {median_of(llava_s, 0):8.2f}  ({median_of(llava_s, 1):8.2f})   wings / llava "
          f"{ratio_of(wings, llava_s, 0):.3f} ({ratio_of(wings, llava_s, 1):.3f}), target >= 0.9")
    print("per-round wings/llava (wall):", " ".join(f"{x[0] / y[0]:.3f}" for x, y in zip(wings, llava_s, strict=True)))


if __name__ == "__main__":
    main()
