"""Decode speed of a Wings model with and without the KV (+ learner) cache, and against HF's own LLaVA.

One image per prompt + a question, greedy, `--batch` prompts at once (each its own easy-vqa image). Every model
has the same backbone sizes; HF `LlavaForConditionalGeneration` is the baseline. Two methods:

- `--method steps` (default): both models prefill once, then decoding steps (one cached forward each, greedy)
  ALTERNATE between them, step by step, in one process: each Wings step has a LLaVA step at the same cache
  length right beside it, and the ratio is the median over those pairs. On a shared machine, where load moves
  from second to second, this is far steadier than timing whole generate() calls.
- `--method generate` (and always for `--cache-impl static`, whose compiled decoding step lives in generate):
  decode tokens/s = (n - 1) / (t(n new tokens) - t(1 new token)), prefill cancelled, runs interleaved per round.

"per CPU-second" divides by this process's CPU time, the steadier figure when other jobs share the cores.

It also times HF LLaVA with Wings attached (`wings.attach`, the same learner layer on the stock class): attached /
llava should match wings / llava. The steps method also times HF LLaVA with Wings' KV cache
(`GrowingDynamicCache`: the same cache, grown in place instead of `torch.cat` of the whole cache per step),
alternating with the others: Wings / that LLaVA is the cost of the Wings layer alone; Wings / stock LLaVA is what
a user sees against HF's own model.

    python benchmarks/bench_generate.py                          # tiny width (hidden 256, 64 image tokens)
    python benchmarks/bench_generate.py --hidden 2048 --layers 2 --heads 16 --kv-heads 16 --intermediate 5632 \\
        --image-size 384 --patch-size 16 --new-tokens 64 --uncached-tokens 4 [--batch 8]
    python benchmarks/bench_generate.py --cache-impl static [--compile]   # pre-allocated caches (compiled forward)

The no-cache figure recomputes prompt and all tokens at every step (`--uncached-tokens` steps timed).
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
from wings.modeling.cache import GrowingDynamicCache
from wings.vlm import attach


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


class Stepper:
    """One model decoding greedily by hand: prefill once, then one cached forward per `step()`."""

    def __init__(self, model, batch, use_cache: bool = True, growing_cache: bool = False):
        self.model, self.use_cache = model, use_cache
        self.batch = dict(batch)
        if growing_cache:  # (a Wings model makes this cache by itself)
            self.batch["cache"] = GrowingDynamicCache(config=model.config.get_text_config(decoder=True))
        with torch.no_grad():
            out = model(**self.batch, use_cache=use_cache)
        self.batch.pop("cache", None)
        self.cache = out.cache if use_cache else None
        self.ids = torch.cat([self.batch["input_ids"], out.logits[:, -1:].argmax(-1)], dim=1)
        self.mask = torch.cat([self.batch["attention_mask"], torch.ones_like(self.ids[:, -1:])], dim=1)

    def step(self) -> tuple[float, float]:
        """Time one decoding step (wall, CPU seconds); the bookkeeping after it is not timed."""
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            if self.use_cache:
                out = self.model(input_ids=self.ids[:, -1:], attention_mask=self.mask, cache=self.cache,
                                 use_cache=True)
            else:  # recompute everything, images included
                out = self.model(input_ids=self.ids, attention_mask=self.mask,
                                 pixel_values=self.batch["pixel_values"], use_cache=False)
            token = out.logits[:, -1:].argmax(-1)
        if token.is_cuda:
            torch.cuda.synchronize()
        times = time.perf_counter() - wall, time.process_time() - cpu
        self.ids = torch.cat([self.ids, token], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(token)], dim=1)
        return times


def step_rates(models: dict, batch, steps: int, use_cache: bool = True,
               growing: tuple[str, ...] = ()) -> dict[str, list[tuple[float, float]]]:
    """Per step, tokens/s per sequence (wall, CPU) of every model; steps alternate between the models (the order
    rotates, so no model always follows the same one). `growing`: models given a `GrowingDynamicCache`."""
    steppers = {name: Stepper(model, batch, use_cache, name in growing) for name, model in models.items()}
    for stepper in steppers.values():  # warm-up
        stepper.step()
    names = list(steppers)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            wall, cpu = steppers[name].step()
            rates[name].append((1 / wall, 1 / max(cpu, 1e-9)))
    return rates


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
    parser.add_argument("--method", default="steps", choices=["steps", "generate"])
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
    attached = attach(hf_llava(model), rank=64, router="position", router_max_positions=4096)  # the same Wings layer
    randomize_learners(attached)
    attached.to(args.device).eval()
    batch = make_batch(processor, args.batch, args.device)
    n = args.new_tokens
    print(f"batch {args.batch} x prompt {batch['input_ids'].shape[1]} tokens ({model.config.image_seq_length} image), "
          f"{n} new tokens; LLM hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, ffn "
          f"{args.intermediate}; {args.device}, {torch.get_num_threads()} threads, cache {args.cache_impl or 'dynamic'}"
          f"{', compiled decode step' if args.compile else ''}; "
          f"wings params {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
    if args.method == "steps" and args.cache_impl != "static":
        print(f"method: {n} decoding steps per model, alternating Wings / LLaVA step by step")
        fast = step_rates({"wings": model, "llava": llava, "llava_growing": llava, "attached": attached}, batch, n,
                          growing=("llava_growing",))
        slow = step_rates({"wings_no_cache": model}, batch, args.uncached_tokens or n, use_cache=False)
    else:
        print(f"method: whole generate() calls, {args.repeats} rounds")
        runs = {"wings": Run(model, True, args.cache_impl, args.compile),
                "llava": Run(llava, True, args.cache_impl, args.compile)}
        if args.cache_impl != "static":  # (attached models decode with the dynamic cache)
            runs["attached"] = Run(attached, True, args.cache_impl, args.compile)
        fast = decode_rates(runs, batch, n, args.repeats)
        slow = decode_rates({"wings_no_cache": Run(model, False)}, batch, args.uncached_tokens or n,
                            args.uncached_repeats)
    wings, llava_s, uncached = fast["wings"], fast["llava"], slow["wings_no_cache"]
    print("decode tok/s per sequence   wall    (per CPU-second)   [medians]")
    print(f"wings, cache      : {median_of(wings, 0):8.2f}  ({median_of(wings, 1):8.2f})")
    print(f"wings, no cache   : {median_of(uncached, 0):8.2f}  ({median_of(uncached, 1):8.2f})   cache speed-up "
          f"{median_of(wings, 0) / median_of(uncached, 0):.1f}x ({median_of(wings, 1) / median_of(uncached, 1):.1f}x)"
          ", target >= 10x")
    print(f"HF llava, cache   : {median_of(llava_s, 0):8.2f}  ({median_of(llava_s, 1):8.2f})   wings / llava "
          f"{ratio_of(wings, llava_s, 0):.3f} ({ratio_of(wings, llava_s, 1):.3f}), target >= 0.9")
    if "llava_growing" in fast:
        same = fast["llava_growing"]
        print(f"HF llava, Wings' KV cache: {median_of(same, 0):8.2f}  ({median_of(same, 1):8.2f})   wings / it "
              f"{ratio_of(wings, same, 0):.3f} ({ratio_of(wings, same, 1):.3f}): the Wings layer alone")
    if "attached" in fast:
        ours, theirs = ratio_of(wings, llava_s, 0), ratio_of(fast["attached"], llava_s, 0)
        print(f"Wings attached to HF llava: {median_of(fast['attached'], 0):8.2f}  "
              f"({median_of(fast['attached'], 1):8.2f})   attached / llava {theirs:.3f}, wings / llava {ours:.3f}: "
              f"they differ by {abs(theirs / ours - 1):.1%} (target: within 5%)")
    pairs = sorted(x[0] / y[0] for x, y in zip(wings, llava_s, strict=True))
    quart = [pairs[int(q * (len(pairs) - 1))] for q in (0.25, 0.5, 0.75)]
    print(f"wings/llava (wall) over {len(pairs)} pairs: quartiles {quart[0]:.3f} / {quart[1]:.3f} / {quart[2]:.3f}")


if __name__ == "__main__":
    main()
