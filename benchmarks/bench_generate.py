"""Decode speed of a Wings model with and without the KV (+ learner) cache, and against HF's own LLaVA.

One image + a question, 256 new tokens (EOS suppressed), greedy. Same backbone sizes for every model:
Qwen2 hidden 256 / 4 layers / vocab ~1000, SigLIP 64 px / patch 8 (64 image tokens). Decode tokens/s is
255 / (t(256 new tokens) - t(1 new token)), so the prompt's prefill cost cancels out; medians of repeats.

    python benchmarks/bench_generate.py [--repeats 3] [--new-tokens 256] [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import easy_vqa
import torch
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration

from wings.builder import TinySpec, build_tiny

SPEC = TinySpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, vocab=1000, image_size=64,
                patch_size=8, vision_hidden=192, vision_layers=4, max_positions=4096, tie_embeddings=True)


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


def timed_generate(model, batch, new_tokens: int, use_cache: bool) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared machine the CPU time is the steadier figure."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=use_cache)
    if out.is_cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return wall, cpu


def decode_rates(runs: dict, batch, new_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median decode tokens/s (wall, CPU) per run, prefill subtracted; the runs are interleaved per repeat so
    that load from other processes hits them alike."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for model, use_cache in runs.values():
        timed_generate(model, batch, 4, use_cache)  # warm-up
    for _ in range(repeats):
        for name, (model, use_cache) in runs.items():
            first = timed_generate(model, batch, 1, use_cache)
            full = timed_generate(model, batch, new_tokens, use_cache)
            samples[name].append(tuple((new_tokens - 1) / (f - s) for f, s in zip(full, first, strict=True)))
    return {name: tuple(statistics.median(x[i] for x in xs) for i in range(2)) for name, xs in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--uncached-repeats", type=int, default=1, help="the slow no-cache run")
    # One thread by default: at these sizes every op is tiny, and with 2 threads on a busy 2-core machine the
    # OpenMP barriers of ~100 small ops per token made timings swing 5x from run to run.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = build_tiny(SPEC, rank=64)
    randomize_learners(model)
    model.to(args.device).eval()
    image = Image.open(easy_vqa.get_test_image_paths()[0])
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat shape is in the image?"}],
                                           add_generation_prompt=True, tokenize=False)
    batch = processor(text=prompt, images=[image]).to(args.device)
    llava = hf_llava(model).to(args.device)
    n = args.new_tokens
    print(f"prompt {batch['input_ids'].shape[1]} tokens ({model.config.image_seq_length} image), {n} new tokens, "
          f"{args.device}, {torch.get_num_threads()} threads, "
          f"wings params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    fast = decode_rates({"wings": (model, True), "llava": (llava, True)}, batch, n, args.repeats)
    slow = decode_rates({"wings_no_cache": (model, False)}, batch, n, args.uncached_repeats)
    (cached, cached_cpu), (llava_rate, llava_cpu) = fast["wings"], fast["llava"]
    uncached, uncached_cpu = slow["wings_no_cache"]
    print("decode tok/s          wall    (per CPU-second)")
    print(f"wings, cache      : {cached:8.1f}  ({cached_cpu:8.1f})")
    print(f"wings, no cache   : {uncached:8.1f}  ({uncached_cpu:8.1f})   cache speed-up {cached / uncached:.1f}x "
          f"({cached_cpu / uncached_cpu:.1f}x), target >= 10x")
    print(f"HF llava, cache   : {llava_rate:8.1f}  ({llava_cpu:8.1f})   wings / llava {cached / llava_rate:.2f} "
          f"({cached_cpu / llava_cpu:.2f}), target >= 0.7")


if __name__ == "__main__":
    main()
