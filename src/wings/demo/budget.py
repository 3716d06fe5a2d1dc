"""Time budget of the embedded demo: measure each block's step time here, then size every stage to fit.

    python -m wings.demo.budget [--llm DIR --vision DIR] [--out timings.json]

measures (with random weights unless DIRs are given: step time does not depend on the values)
  * the base LLM's and the vision encoder's pretraining steps,
  * one real `wings.training.train` run per stage (llava_stage1/2, wings_stage1/2: the stage YAMLs with the
    demo's overrides, real easy-vqa batches through the data pipeline and `WingsTrainer`),
and prints the plan `plan(mode, timings)` would give for --quick and full mode, with predicted seconds.

Per-step times are the *median* of the timed steps after two warm-up steps: on a shared 2-core machine other
processes make single steps 5-8x slower, and the median ignores those spikes better than the mean.

Measured on the 2-core CPU machine when idle (torch 2 threads; ms per optimizer step):
  base LLM (Qwen2 h128 L4, ~1.1M params) B=32 text: 46-54     vision (SigLIP h64 L2, 32px/patch 8) B=128: 19
  llava_stage1 B=32: 52   llava_stage2 B=16: 39   wings_stage1 B=32: 70   wings_stage2 B=16: 68 (+~1 s setup each)
With another busy process on the machine, 2-thread steps slow down 5-8x (OpenMP threads spin against each other:
46 -> 383 ms) while 1 thread stays at ~68 ms; so run one demo at a time, or set torch.set_num_threads(1) when
the machine is shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

STAGES = ("llava_stage1", "llava_stage2", "wings_stage1", "wings_stage2")
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


@dataclass
class StagePlan:
    """One MLLM training stage of the demo: steps, batch and the learning rate of each trained group."""

    steps: int
    batch_size: int
    lrs: dict[str, float] = field(default_factory=dict)


@dataclass
class DemoPlan:
    """Everything the demo trains, with sizes; `seconds(timings)` predicts the training time."""

    mode: str
    base_llm_steps: int
    base_llm_verify: bool  # train the base LLM on the yes/no checks too (needs ~2000 steps to stay accurate)
    vision_steps: int
    stages: dict[str, StagePlan]
    vqa_train_records: int  # easy-vqa questions sampled for stage 2 (stage 1 uses captions of the same images)
    text_eval_tasks: int  # held-out text tasks scored per model (all of them: ~170)
    vqa_eval_tasks: int  # easy-vqa test questions scored per MLLM
    iit_per_config: int = 50  # IIT dialogues per configuration (T, TT, TTT, TTV, TV, V)
    laws_items: int = 64  # easy-vqa test items for MLLM-LAWS
    # Decoder layers of the base LLM (each LAWS correlation has this many points). 8 layers with the same base-LLM
    # recipe (full mode, seed 0, 2000 steps at 3e-3) plateaued at loss 0.63 (4 layers: 0.13) and scored 0.52
    # held-out / 0.62 seen text (4 layers, same seed: 0.91 / 0.99), at 2.0x the base LLM's step time: not kept.
    llm_layers: int = 4

    def seconds(self, timings: dict) -> dict[str, float]:
        """Predicted wall time per block from measured ms/step (stage steps scale with batch size linearly)."""
        out = {"base_llm": self.base_llm_steps * timings["base_llm"]["ms_per_step"] / 1000,
               "vision": self.vision_steps * timings["vision"]["ms_per_step"] / 1000}
        for name, stage in self.stages.items():
            t = timings["stages"][name]
            per_sample = t["ms_per_step"] / t["batch_size"]
            out[name] = stage.steps * stage.batch_size * per_sample / 1000 + t["setup_s"]
        out["total_training"] = sum(out.values())
        return {k: round(v, 1) for k, v in out.items()}


# Learning rates for a ~1M-parameter model trained from scratch at 3e-3: the released recipe's rates
# (2e-5 LLM in LLaVA stage 2, 2e-6 in Wings stage 2) are ~100x too small to move it in a few hundred steps, so
# the baseline's LLM gets 2e-5 x 50 = 1e-3. Measured (seed 0, 600 stage-2 steps, base held-out text 0.837):
#   LLaVA (LLM 1e-3)                                                 text 0.58  easy-vqa 0.74
#   Wings LLM 1e-4, all learners + router 1e-3 (recipe ratios)       text 0.78  easy-vqa 0.59
#   Wings LLM 1e-5, learners 1e-3                                    text 0.43  (the textual learner/router,
#                                                                     trained on image data, erase text)
#   Wings LLM 3e-4, visual 4e-3, textual + router 1e-4, proj 2e-3    text 0.78  easy-vqa 0.65
# The visual learner never runs on text-only input, so it can take a high rate for free; the router (2 x 3
# weights per layer with the segment router) needs a larger one; the LLM keeps 1/3 of the baseline's rate.
# Quick mode (400 stage-2 steps, same seed; LLaVA there: text 0.59, easy-vqa 0.74), Wings stage 2 only:
#   the rates above                                                   text 0.66  easy-vqa 0.52
#   router 1e-3 (the rest as above)                                   text 0.70  easy-vqa 0.58  (then used)
#   router 1e-3, LLM 5e-4                                             text 0.63  easy-vqa 0.53
#   router 1e-3, visual 8e-3, projector 4e-3                          text 0.72  easy-vqa 0.54
#   LLM 1e-3 (the baseline's rate), router 1e-4                       text 0.51  easy-vqa 0.81
# Those were single-seed, image-only stage 2. Over seeds, Wings' yes/no answers were bimodal (chance on some
# runs): with the textual learner at 1e-4 it hardly moves (output projection norm 0.4 vs the visual learner's
# 4.5), so yes/no, which needs the question's word at the answer token, waits on the LLM at 3e-4 and takes off
# late or never. With the paper's stage-2 mix (6% text-only), re-running only stage 2 (quick, 400 steps):
#                                   seed 0: yes/no  easy-vqa  text     seed 1: yes/no  easy-vqa  text
#   the rates above (textual 1e-4)          0.51    0.50      0.78             0.50    0.47      0.63
#   LLM 1e-3                                0.85    0.80      0.72             0.60    0.56      0.52
#   textual learner 1e-3                    0.69    0.66      0.78             0.79    0.69      0.65  <- used
# The text-only share of the mix keeps the faster textual learner from erasing text knowledge (the 0.43
# above was without it). Details: docs/demo/yes-no.md.
TINY_LR_SCALE = 50
TINY_LRS = {
    "llava_stage1": {"projector": 2e-3},
    "llava_stage2": {"llm": 2e-5 * TINY_LR_SCALE, "projector": 1e-3},
    "wings_stage1": {"projector": 2e-3, "visual_learner": 2e-3},
    "wings_stage2": {"llm": 3e-4, "projector": 2e-3, "visual_learner": 4e-3, "textual_learner": 1e-3,
                     "router": 1e-3},
}


def plan(mode: str = "full") -> DemoPlan:
    """The proposed sizes (see the report in the module docstring of `wings.demo` for the measurements)."""
    if mode == "quick":
        # 120 stage-2 steps left easy-vqa at chance (0.44-0.46); at 400 both models were still climbing (0.47-0.80
        # over seeds 0-1), so quick uses 600 (docs/demo/QUICK_SEEDS.md: every seed and thread count measured)
        stages = {"llava_stage1": StagePlan(100, 32, TINY_LRS["llava_stage1"]),
                  "llava_stage2": StagePlan(600, 16, TINY_LRS["llava_stage2"]),
                  "wings_stage1": StagePlan(100, 32, TINY_LRS["wings_stage1"]),
                  "wings_stage2": StagePlan(600, 16, TINY_LRS["wings_stage2"])}
        return DemoPlan("quick", base_llm_steps=600, base_llm_verify=False, vision_steps=250, stages=stages,
                        vqa_train_records=4000,
                        text_eval_tasks=172, vqa_eval_tasks=300, iit_per_config=20, laws_items=32)
    if mode == "full":
        stages = {"llava_stage1": StagePlan(300, 32, TINY_LRS["llava_stage1"]),
                  "llava_stage2": StagePlan(1500, 16, TINY_LRS["llava_stage2"]),
                  "wings_stage1": StagePlan(300, 32, TINY_LRS["wings_stage1"]),
                  "wings_stage2": StagePlan(1500, 16, TINY_LRS["wings_stage2"])}
        return DemoPlan("full", base_llm_steps=2000, base_llm_verify=True, vision_steps=600, stages=stages,
                        vqa_train_records=20000,
                        text_eval_tasks=172, vqa_eval_tasks=1000, iit_per_config=50, laws_items=64)
    raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")


# ---------------------------------------------------------------------------------------------------------------
# Measurement


def _median_ms(times: list[float], skip: int = 2) -> float:
    kept = times[skip:] or times
    return round(1000 * statistics.median(kept), 1)


def time_base_llm(steps: int = 20) -> dict:
    from ..data.synthetic import build_knowledge, text_records
    from .base_llm import BaseLLMSpec, demo_tokenizer, train_base_llm

    kb = build_knowledge(0)
    tokenizer = demo_tokenizer(kb)
    spec = BaseLLMSpec(steps=steps)
    start = time.perf_counter()
    _, stats = train_base_llm(text_records(kb), tokenizer, spec, progress=False)
    return {"ms_per_step": stats["ms_per_step"], "batch_size": spec.batch_size, "steps": steps,
            "seconds": round(time.perf_counter() - start, 2)}


def time_vision(steps: int = 30) -> dict:
    from .vision import VisionSpec, build_encoder, load_images, pretrain_encoder

    spec = VisionSpec(steps=steps)
    start = time.perf_counter()
    train = load_images("train", build_encoder(spec)[1])
    load_s = time.perf_counter() - start
    _, stats = pretrain_encoder(spec, train)
    return {"ms_per_step": stats["ms_per_step"], "batch_size": spec.batch_size, "load_images_s": round(load_s, 2)}


def compose_demo_models(llm, tokenizer, encoder, image_processor, out_dir: str | Path, rank: int = 16,
                        router: str = "segment", feature_layer: int = -1) -> dict[str, Path]:
    """Save a llava-mode and a wings-mode start model composed from the same base LLM + encoder. The Wings one is
    stage-1 shaped (visual learners only): stage 2 adds the textual learners and the router."""
    from ..builder import compose, save

    dirs = {}
    for mode in ("llava", "wings"):
        parts = {"use_textual_learner": False, "use_router": False} if mode == "wings" else {}
        model, processor = compose(copy.deepcopy(llm), copy.deepcopy(tokenizer), copy.deepcopy(encoder),
                                   image_processor, mode=mode, rank=rank, router=router,
                                   vision_feature_layer=feature_layer, **parts)
        dirs[mode] = save(model, processor, Path(out_dir) / f"init_{mode}")
    return dirs


def stage_overrides(stage: str, model_dir: Path, data_path: Path, out_dir: Path, steps: int, batch_size: int,
                    lrs: dict[str, float]) -> list[str]:
    """`--set` overrides that turn a stage YAML into a demo run (CPU, fp32, no checkpoints, no tensorboard)."""
    sets = [f"model.path={model_dir}", f"data.path={data_path}", f"output_dir={out_dir}",
            f"train.max_steps={steps}", f"train.batch_size={batch_size}", "train.grad_accum=1",
            "train.precision=fp32", "train.gradient_checkpointing=false", "train.report_to=[]",
            f"train.save_steps={10 ** 9}", "train.logging_steps=1", "train.use_cpu=true", "train.resume=null",
            "overwrite=true",  # a demo rerun into the same --out replaces its stages (train refuses otherwise)
            "data.max_length=256"]
    return sets + [f"groups.{group}.lr={lr}" for group, lr in lrs.items()]


def time_stage(stage: str, model_dir: Path, data_path: Path, work: Path, steps: int, batch_size: int) -> dict:
    """Run `steps` real optimizer steps of a stage with `wings.training.train`; ms/step and setup seconds."""
    from ..training import load_config, train
    from .common import StepTimer

    config = load_config(CONFIG_DIR / f"{stage}.yaml",
                         stage_overrides(stage, model_dir, data_path, work / stage, steps, batch_size,
                                         TINY_LRS[stage]))
    timer = StepTimer()
    start = time.perf_counter()
    train(config, callbacks=[timer])
    total = time.perf_counter() - start
    ms = _median_ms(timer.times)
    return {"ms_per_step": ms, "batch_size": batch_size, "steps": steps,
            "setup_s": round(max(0.0, total - sum(timer.times)), 2)}


def measure(llm_dir: str | None = None, vision_dir: str | None = None, stage_steps: int = 12,
            batch_sizes: dict[str, int] | None = None) -> dict:
    """All demo timings on this machine (see the module docstring)."""
    from ..data.easyvqa import llava_records
    from ..data.synthetic import write_jsonl

    torch.manual_seed(0)
    timings: dict = {"threads": torch.get_num_threads(), "base_llm": time_base_llm(), "vision": time_vision()}
    llm, tokenizer, encoder, image_processor = _components(llm_dir, vision_dir)
    batch_sizes = batch_sizes or {s: p.batch_size for s, p in plan("full").stages.items()}
    with tempfile.TemporaryDirectory(prefix="wings_budget_") as tmp:
        work = Path(tmp)
        inits = compose_demo_models(llm, tokenizer, encoder, image_processor, work)
        data = write_jsonl(llava_records("train", size=2000, seed=0), work / "vqa.jsonl")
        timings["stages"] = {}
        for stage in STAGES:
            init = inits["llava" if stage.startswith("llava") else "wings"]
            timings["stages"][stage] = time_stage(stage, init, data, work, stage_steps, batch_sizes[stage])
    return timings


def _components(llm_dir: str | None, vision_dir: str | None):
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

    from ..data.synthetic import build_knowledge
    from .base_llm import BaseLLMSpec, build_base_llm, demo_tokenizer
    from .vision import VisionSpec, build_encoder

    if llm_dir:
        llm, tokenizer = AutoModelForCausalLM.from_pretrained(llm_dir), AutoTokenizer.from_pretrained(llm_dir)
    else:
        tokenizer = demo_tokenizer(build_knowledge(0))
        llm = build_base_llm(BaseLLMSpec(), tokenizer)
    if vision_dir:
        encoder, image_processor = SiglipVisionModel.from_pretrained(vision_dir), AutoImageProcessor.from_pretrained(
            vision_dir)
    else:
        encoder, image_processor = build_encoder(VisionSpec())
    return llm, tokenizer, encoder, image_processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", help="a saved base LLM dir (default: random weights of the demo's size)")
    parser.add_argument("--vision", help="a saved vision encoder dir (default: random weights)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per stage")
    parser.add_argument("--out", help="write the timings and both plans to this JSON file")
    args = parser.parse_args(argv)
    timings = measure(args.llm, args.vision, args.steps)
    report = {"timings": timings}
    for mode in ("quick", "full"):
        p = plan(mode)
        report[mode] = {"plan": asdict(p), "predicted_seconds": p.seconds(timings)}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
