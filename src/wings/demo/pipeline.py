"""The demo's training + core evaluation, end to end: base LLM, vision encoder, LLaVA and Wings stages 1+2.

    run_demo(out_dir, mode="quick"|"full", seed=0) -> results dict (also written to out_dir/results.json)

Layout of `out_dir`: data/ (every record and task file used), base_llm/, vision/, init_{llava,wings}/,
{llava,wings}_stage{1,2}/ (each with train_config.yaml, data_report.json and final/), logs/ (everything the
console does not show), results.json, REPORT.md and the plots.
Stage 1 trains on captions of the easy-vqa training images (alignment, as LLaVA's stage 1 uses captions);
stage 2 on easy-vqa training questions plus, by default, text-only records at the paper's share (the
released recipe's stage-2 data, LLaVA-665K, holds ~40K text-only ShareGPT conversations of 665K: 6%). Sizes
and learning rates come from `wings.demo.budget.plan(mode)`. Then: IIT configurations, MLLM-LAWS, PNG plots and
REPORT.md (`wings.demo.analysis`). Several seeds: `wings.demo.seeds.run_seeds`.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import set_seed

from ..data.easyvqa import caption_records, eval_tasks, llava_records
from ..data.synthetic import build_knowledge, text_records, text_tasks, write_jsonl
from ..evaluation.io import write_json
from . import analysis
from .base_llm import BaseLLMSpec, demo_tokenizer, save_base_llm, text_accuracy, train_base_llm
from .budget import CONFIG_DIR, DemoPlan, compose_demo_models, plan, stage_overrides
from .console import DemoConsole, expect_load_changes, intended_load_changes, load_note
from .vision import VisionSpec, build_encoder, load_images, pretrain_encoder, save_encoder

FAMILIES = ("llava", "wings")
TEXT_MIX_RATIO = 0.06  # text-only share of stage 2: LLaVA-665K's 40K ShareGPT conversations of 665K


def write_data(out: Path, p: DemoPlan, seed: int) -> dict[str, Path]:
    """Every data file of the demo (the stage-2 text-only share is drawn from `text_train` at training time)."""
    kb = build_knowledge(seed)
    data = out / "data"
    return {
        "text_train": write_jsonl(text_records(kb, verify=p.base_llm_verify), data / "text_train.jsonl"),
        "text_heldout": write_jsonl(text_tasks(kb, "heldout"), data / "text_heldout.jsonl"),
        "text_seen": write_jsonl(text_tasks(kb, "seen"), data / "text_seen.jsonl"),
        "stage1": write_jsonl(caption_records("train", seed=seed), data / "stage1_captions.jsonl"),
        "stage2": write_jsonl(llava_records("train", size=p.vqa_train_records, seed=seed), data / "stage2_vqa.jsonl"),
        "vqa_test": write_jsonl(eval_tasks("test", size=p.vqa_eval_tasks, seed=seed), data / "vqa_test.jsonl"),
    }


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_base(out: Path, p: DemoPlan, files: dict[str, Path], seed: int, console: DemoConsole):
    kb = build_knowledge(seed)
    with console.block("base_llm") as bar:
        tokenizer = demo_tokenizer(kb)
        spec = BaseLLMSpec(steps=p.base_llm_steps, layers=p.llm_layers, seed=seed)
        llm, stats = train_base_llm(_read_jsonl(files["text_train"]), tokenizer, spec,
                                    callbacks=[bar.trainer_callback()])
        stats["heldout"] = text_accuracy(llm, tokenizer, _read_jsonl(files["text_heldout"]), "base", generate=False)
        save_base_llm(llm, tokenizer, out / "base_llm", stats)
    return llm, tokenizer, stats


def build_vision(out: Path, p: DemoPlan, seed: int, console: DemoConsole):
    spec = VisionSpec(steps=p.vision_steps, seed=seed)
    with console.block("vision", total=spec.steps) as bar:
        _, processor = build_encoder(spec)

        def progress(step: int, loss: float) -> None:
            bar.advance_to(step)
            bar.loss(loss)

        encoder, stats = pretrain_encoder(spec, load_images("train", processor), load_images("test", processor),
                                          progress=progress)
        save_encoder(encoder, processor, out / "vision", stats)
    return encoder, processor, spec, stats


def stage_sets(stage: str, p: DemoPlan, start: Path, files: dict[str, Path], out: Path, seed: int,
               text_replay: bool) -> list[str]:
    """The `--set` overrides of one demo stage: the budget's sizes and rates, the seed, the stage-2 text share,
    and the Trainer's own console output off (its per-step log lines still go to the stage's log file)."""
    sp = p.stages[stage]
    k = int(stage[-1])
    sets = stage_overrides(stage, start, files[f"stage{k}"], out / stage, sp.steps, sp.batch_size, sp.lrs)
    sets += [f"train.seed={seed}", "train.extra_args.disable_tqdm=true"]
    if k == 2 and text_replay:
        sets += [f"data.text_mix_path={files['text_train']}", f"data.text_mix_ratio={TEXT_MIX_RATIO}"]
    return sets


def train_stages(out: Path, p: DemoPlan, files: dict[str, Path], inits: dict[str, Path], seed: int,
                 text_replay: bool, console: DemoConsole) -> dict:
    """llava_stage1 -> llava_stage2 and wings_stage1 -> wings_stage2 through `wings.training.train`."""
    from ..training import load_config, train

    results = {}
    for family in FAMILIES:
        start = inits[family]
        for k in (1, 2):
            stage = f"{family}_stage{k}"
            config = load_config(CONFIG_DIR / f"{stage}.yaml",
                                 stage_sets(stage, p, start, files, out, seed, text_replay))
            added, dropped = intended_load_changes(start, config.model.overrides)
            note = load_note(stage, added, dropped)
            if note:
                console.note(note)
            t0 = time.perf_counter()
            with console.block(stage) as bar, expect_load_changes(added, dropped):
                result = train(config, callbacks=[bar.trainer_callback()])
            results[stage] = {"seconds": round(time.perf_counter() - t0, 1), "final_dir": str(result.final_dir),
                              "losses": list(zip(result.steps, result.losses, strict=True)),
                              "train_loss": result.train_loss, "trainable": result.trainable,
                              "data": _data_report(out / stage)}
            start = result.final_dir
    return results


def _data_report(stage_dir: Path) -> dict:
    path = stage_dir / "data_report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate_models(out: Path, files: dict[str, Path], stages: dict, console: DemoConsole) -> dict:
    """Held-out and seen text accuracy (base and both MLLMs) and easy-vqa test accuracy (both MLLMs), per category."""
    from ..evaluation import evaluate_task, load_eval_model, load_task

    models = {"base": out / "base_llm"} | {f: Path(stages[f"{f}_stage2"]["final_dir"]) for f in FAMILIES}
    tasks = {name: load_task(files[name]) for name in ("text_heldout", "text_seen", "vqa_test")}
    categories = {name: {t["id"]: t.get("category", "all") for t in _read_jsonl(files[name])} for name in tasks}
    scores: dict[str, dict] = {}
    with console.block("evaluation", total=3 * len(models) - 1) as bar:
        for label, path in models.items():
            em = load_eval_model(path, device="cpu", label=label)
            scores[label] = {}
            for name, task in tasks.items():
                if name == "vqa_test" and label == "base":
                    continue
                result = evaluate_task(em, task, batch_size=64, progress=False)
                per: dict[str, list[bool]] = {}
                for row in result.predictions:
                    per.setdefault(categories[name][row["id"]], []).append(row["correct"])
                metrics = result.metrics()
                scores[label][name] = {**{k: metrics[k] for k in ("accuracy", "ci95", "correct", "n")},
                                       "per_category": {c: sum(v) / len(v) for c, v in sorted(per.items())}}
                if name == "vqa_test":  # what a model that fails yes/no answers: always one word, or noise?
                    yes_no = [r for r in result.predictions if categories[name][r["id"]] == "yesno"]
                    scores[label][name]["yes_rate"] = sum(r["prediction"] == "yes" for r in yes_no) / max(
                        1, len(yes_no))
                bar.update(1)
    return scores


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_demo(out_dir: str | Path, mode: str = "quick", seed: int = 0, progress: bool = True,
             stage2_steps: int | None = None, text_replay: bool = True, console: DemoConsole | None = None) -> dict:
    """The whole demo for one seed. `stage2_steps` overrides both stage-2 lengths (the README's budget sweep);
    `text_replay=False` is the image-only stage-2 ablation."""
    if stage2_steps is not None and stage2_steps < 1:
        raise ValueError(f"stage2_steps must be a positive number of steps, got {stage2_steps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = console or DemoConsole(out / "logs", progress=progress)
    p = plan(mode)
    if stage2_steps is not None:
        for family in FAMILIES:
            p.stages[f"{family}_stage2"].steps = stage2_steps
    set_seed(seed)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    timings: dict[str, float] = {}

    def tick(name: str, since: float) -> None:
        timings[name] = round(time.perf_counter() - since, 1)

    t = time.perf_counter()
    files = write_data(out, p, seed)
    tick("data", t)
    t = time.perf_counter()
    llm, tokenizer, base_stats = build_base(out, p, files, seed, console)
    tick("base_llm", t)
    t = time.perf_counter()
    encoder, image_processor, vspec, vision_stats = build_vision(out, p, seed, console)
    tick("vision", t)
    with console.block("compose"):
        inits = compose_demo_models(llm, tokenizer, encoder, image_processor, out, feature_layer=vspec.feature_layer)
    t = time.perf_counter()
    stages = train_stages(out, p, files, inits, seed, text_replay, console)
    tick("stages", t)
    t = time.perf_counter()
    scores = evaluate_models(out, files, stages, console)
    tick("evaluation", t)
    mllms = {f: Path(stages[f"{f}_stage2"]["final_dir"]) for f in FAMILIES}
    t = time.perf_counter()
    with console.block("iit", total=len(mllms)) as bar:
        iit = analysis.run_iit(out, files, mllms, per_config=p.iit_per_config, seed=seed, done=bar.update)
    tick("iit", t)
    t = time.perf_counter()
    with console.block("laws", total=len(mllms)) as bar:
        laws = analysis.run_laws(out, files, mllms, max_items=p.laws_items, done=bar.update)
    tick("laws", t)
    timings["total"] = round(time.perf_counter() - t0, 1)
    timings["cpu_total"] = round(_cpu_seconds() - cpu0, 1)
    results = {"mode": mode, "seed": seed, "plan": asdict(p), "text_replay": text_replay,
               "text_mix_ratio": TEXT_MIX_RATIO if text_replay else 0.0, "threads": torch.get_num_threads(),
               "base_llm": {k: v for k, v in base_stats.items() if k != "losses"},
               "vision": {k: v for k, v in vision_stats.items() if k != "losses"}, "stages": stages,
               "scores": scores, "iit": iit, "laws": laws, "timings": timings,
               "vision_pretraining": "supervised shape/colour heads on easy-vqa training images (wings.demo.vision)"}
    with console.block("report"):
        results["plots"] = analysis.make_plots(out, results)
        analysis.write_report(out, results)
        write_json(out / "results.json", results)
    return results


def table(results: dict) -> str:
    """The printed summary (the same markdown table as REPORT.md), the total time, and the command that opens
    the two trained models side by side in the web page."""
    timings = results["timings"]
    return (f"{analysis.summary_table(results)}\ntotal time {timings['total']:.0f} s "
            f"(CPU time {timings.get('cpu_total', float('nan')):.0f} s, {results.get('threads', '?')} threads)\n"
            f"compare them in a browser: {serve_command(results)}")


def serve_command(results: dict) -> str:
    """`wings serve WINGS --compare LLAVA` on this run's two stage-2 models (the web page's compare mode)."""
    import shlex

    final = {f: shlex.quote(str(results["stages"][f"{f}_stage2"]["final_dir"])) for f in FAMILIES}
    return f"wings serve {final['wings']} --compare {final['llava']} --served-model-name wings --compare-name llava"
