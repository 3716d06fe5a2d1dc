"""`wings study`: Wings beside the baselines people already use, and its own ablations, on the demo's task.

    run_study(out_dir, mode="full"|"quick", seeds=[0, 1, 2], variants=None) -> results (also results.json,
    REPORT.md, table.md and the plots in out_dir)

Per seed, everything the variants can share is trained once: the base LLM, the vision encoder, and both stage-1
models (`llava_stage1`, `wings_stage1`). Then every variant (wings.demo.variants) trains its own stage 2 from
its stage-1 model with the same data, seed and demo sizes, and is scored with the demo's tasks: text-only
held-out / seen accuracy, easy-vqa per question type, IIT, MLLM-LAWS; Wings variants with a learned router also
get the router's training diagnostics (router_diagnostics.jsonl) and its per-question-type, per-layer profile.
The interpolation curve mixes llava_stage1 and the paper-mix LLaVA weight by weight and scores each point.

Layout of out_dir: seed-N/ (data/, base_llm/, vision/, init_*/, llava_stage1/, wings_stage1/, variants/NAME/,
interp/alpha-A/, logs/, results.json), then results.json, table.md, REPORT.md and the PNGs over all seeds.
`resume=True` keeps a variant (or a seed's shared stages) already finished in out_dir with the same plan.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import set_seed

from ..evaluation.io import write_json
from .budget import CONFIG_DIR, DemoPlan, StagePlan, compose_demo_models, plan, stage_overrides
from .console import DemoConsole, expect_load_changes, intended_load_changes, load_note, seed_consoles
from .variants import INTERPOLATION_ALPHAS, VARIANTS, Variant, stage2_sets

STAGE1 = ("llava_stage1", "wings_stage1")
EVAL_TASKS = ("text_heldout", "text_seen", "vqa_test")


@dataclass
class StudyPlan:
    """The demo's sizes for the shared stages and every stage 2, plus the study's own evaluation sizes."""

    mode: str
    demo: DemoPlan
    profile_items: int  # prompts per task for the router's per-question-type profile
    alphas: tuple[float, ...] = INTERPOLATION_ALPHAS
    notes: dict = field(default_factory=dict)


def study_plan(mode: str = "full") -> StudyPlan:
    """"full": the demo's full mode (its base LLM, encoder, stage 1 and stage 2 sizes and evaluation sets; see
    budget.py), with 30 instead of 50 IIT dialogues per configuration (scoring a model takes ~10-15 s of the
    ~25 min a seed takes on 2 idle cores; training the 13 stage-2 runs takes the rest).
    "quick": the test suite's scale (a few minutes on 2 cores; nothing is learned well enough to compare)."""
    if mode == "full":
        p = plan("full")
        p.mode = "study"
        p.iit_per_config = 30
        return StudyPlan("full", p, profile_items=96)
    if mode == "quick":
        p = plan("quick")
        p.mode = "study-quick"
        p.base_llm_steps, p.vision_steps, p.vqa_train_records = 300, 120, 1000
        p.stages = {name: StagePlan(40 if name.endswith("1") else 60, 16, dict(s.lrs)) for name, s in p.stages.items()}
        p.vqa_eval_tasks, p.iit_per_config, p.laws_items = 48, 2, 8
        return StudyPlan("quick", p, profile_items=16)
    raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes of `run_variants`)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _fingerprint(*parts) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _done(path: Path, fingerprint: str) -> dict | None:
    """The result a finished unit left at `path`, if it was produced with the same fingerprint."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved.get("result") if saved.get("fingerprint") == fingerprint else None


# ---------------------------------------------------------------------------------------------------------------
# Training


def train_shared(out: Path, sp: StudyPlan, seed: int, console: DemoConsole) -> dict:
    """Data, base LLM, vision encoder, init models and both stage-1 models: once per seed for every variant."""
    from ..training import load_config, train
    from .pipeline import build_base, build_vision, write_data

    p = sp.demo
    timings: dict[str, float] = {}
    t = time.perf_counter()
    files = write_data(out, p, seed)
    llm, tokenizer, base_stats = build_base(out, p, files, seed, console)
    timings["base_llm"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    encoder, image_processor, vspec, vision_stats = build_vision(out, p, seed, console)
    timings["vision"] = round(time.perf_counter() - t, 1)
    with console.block("compose"):
        inits = compose_demo_models(llm, tokenizer, encoder, image_processor, out, feature_layer=vspec.feature_layer)
    stages = {}
    for stage in STAGE1:
        family = stage.split("_")[0]
        s = p.stages[stage]
        sets = stage_overrides(stage, inits[family], files["stage1"], out / stage, s.steps, s.batch_size, s.lrs)
        config = load_config(CONFIG_DIR / f"{stage}.yaml", sets + [f"train.seed={seed}",
                                                                    "train.extra_args.disable_tqdm=true"])
        t = time.perf_counter()
        with console.block(stage) as bar, expect_load_changes(*intended_load_changes(inits[family],
                                                                                     config.model.overrides)):
            result = train(config, callbacks=[bar.trainer_callback()])
        timings[stage] = round(time.perf_counter() - t, 1)
        stages[stage] = {"final_dir": str(result.final_dir), "trainable": result.trainable,
                         "losses": list(zip(result.steps, result.losses, strict=True))}
    return {"files": {k: str(v) for k, v in files.items()},
            "base_llm": {k: v for k, v in base_stats.items() if k != "losses"},
            "vision": {k: v for k, v in vision_stats.items() if k != "losses"}, "stages": stages, "timings": timings}


def train_variant(out: Path, sp: StudyPlan, variant: Variant, seed: int, shared: dict, lora_rank: int | None,
                  console: DemoConsole) -> dict:
    """One variant's stage 2 through `wings.training.train` (its router diagnostics included)."""
    from ..training import load_config, train

    stage = f"{variant.family}_stage2"
    s = sp.demo.stages[stage]
    start = Path(shared["stages"][variant.start_stage]["final_dir"])
    files = {k: Path(v) for k, v in shared["files"].items()}
    sets = stage_overrides(stage, start, files["stage2"], out / "variants" / variant.name, s.steps, s.batch_size,
                           s.lrs)
    sets += [f"train.seed={seed}", "train.extra_args.disable_tqdm=true"]
    config = load_config(CONFIG_DIR / f"{stage}.yaml", sets + stage2_sets(variant, s.lrs, files["text_train"],
                                                                          lora_rank))
    added, dropped = intended_load_changes(start, config.model.overrides)
    note = load_note(variant.name, added, dropped)
    if note:
        console.note(note)
    t = time.perf_counter()
    with console.block(variant.name) as bar, expect_load_changes(added, dropped):
        result = train(config, callbacks=[bar.trainer_callback()])
    report = out / "variants" / variant.name / "data_report.json"
    data = json.loads(report.read_text()) if report.is_file() else {}
    return {"final_dir": str(result.final_dir), "seconds": round(time.perf_counter() - t, 1),
            "trainable": result.trainable, "losses": list(zip(result.steps, result.losses, strict=True)),
            "text_mix_added": data.get("text_mix", {}).get("added", 0)}


def lora_rank_for(shared: dict) -> tuple[int, int, int]:
    """(LoRA rank, its weight count, Wings' learner weight count): the rank whose count is nearest the learners'."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..training.config import DEFAULT_LORA_TARGETS
    from .variants import learner_parameter_count, lora_parameter_count, matched_lora_rank

    wings_config = AutoConfig.from_pretrained(shared["stages"]["wings_stage1"]["final_dir"])
    target = learner_parameter_count(wings_config)
    llava = AutoModelForImageTextToText.from_pretrained(shared["stages"]["llava_stage1"]["final_dir"])
    rank = matched_lora_rank(llava, target, DEFAULT_LORA_TARGETS)
    return rank, lora_parameter_count(llava, rank, DEFAULT_LORA_TARGETS), target


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def score_model(path: Path, label: str, files: dict[str, Path], with_vqa: bool = True) -> dict:
    """Text-only held-out / seen accuracy and (MLLMs) easy-vqa per question type with the yes-rate."""
    from ..evaluation import evaluate_task, load_eval_model, load_task

    em = load_eval_model(path, device="cpu", label=label)
    scores = {}
    for name in EVAL_TASKS:
        if name == "vqa_test" and not with_vqa:
            continue
        categories = {t["id"]: t.get("category", "all") for t in _read_jsonl(files[name])}
        result = evaluate_task(em, load_task(files[name]), batch_size=64, progress=False)
        per: dict[str, list[bool]] = {}
        for row in result.predictions:
            per.setdefault(categories[row["id"]], []).append(row["correct"])
        metrics = result.metrics()
        scores[name] = {**{k: metrics[k] for k in ("accuracy", "ci95", "correct", "n")},
                        "per_category": {c: sum(v) / len(v) for c, v in sorted(per.items())}}
        if name == "vqa_test":
            yes_no = [r for r in result.predictions if categories[r["id"]] == "yesno"]
            scores[name]["yes_rate"] = sum(r["prediction"] == "yes" for r in yes_no) / max(1, len(yes_no))
    return scores


def profile_router(sp: StudyPlan, model_dir: Path, files: dict[str, Path]) -> dict:
    """The trained router's w_v by question type, token kind and layer (wings.demo.router_profile)."""
    from ..evaluation import load_task
    from .router_profile import router_profile

    tasks = {name: load_task(files[name]).items for name in ("vqa_test", "text_heldout")}
    categories = {"vqa_test": {t["id"]: t.get("category", "all") for t in _read_jsonl(files["vqa_test"])}}
    return router_profile(model_dir, tasks, categories, max_items=sp.profile_items)


def evaluate_variant(out: Path, sp: StudyPlan, variant: Variant, model_dir: Path, files: dict[str, Path],
                     seed: int) -> dict:
    """Scores, IIT, LAWS and (learned router) the router's diagnostics and profile of one trained variant."""
    from ..training.router_diagnostics import read_rows
    from .analysis import run_iit, run_laws

    p = sp.demo
    result = {"scores": score_model(model_dir, variant.name, files)}
    result["iit"] = run_iit(out, files, {variant.name: model_dir}, per_config=p.iit_per_config, seed=seed)[variant.name]
    laws = run_laws(out, files, {variant.name: model_dir}, max_items=p.laws_items)[variant.name]
    result["laws"] = {"attention_shift": laws["attention_shift"], "laws_mean": laws["laws_mean"]}
    if variant.has_router:
        rows = read_rows(model_dir.parent / "router_diagnostics.jsonl")
        result["router"] = {"diagnostics": rows, "profile": profile_router(sp, model_dir, files)}
    return result


def interpolation_curve(out: Path, sp: StudyPlan, shared: dict, llava: dict, files: dict[str, Path],
                        console: DemoConsole) -> dict[str, dict]:
    """Score every mixing weight: alpha 0 is llava_stage1 itself (the base LLM's weights), alpha 1 the tuned LLaVA
    (its scores are reused); the points between are interpolated and saved under interp/."""
    from .interpolate import interpolate_dirs

    start = Path(shared["stages"]["llava_stage1"]["final_dir"])
    tuned = Path(llava["final_dir"])
    curve = {}
    with console.block("interpolation", total=len(sp.alphas)) as bar:
        for alpha in sp.alphas:
            key = f"{alpha:g}"
            if alpha == 1.0:
                curve[key] = {"alpha": alpha, "scores": llava["scores"], "model": str(tuned)}
            else:
                path = start if alpha == 0.0 else interpolate_dirs(start, tuned, alpha, out / "interp" / f"alpha-{key}")
                curve[key] = {"alpha": alpha, "scores": score_model(path, f"interp {key}", files), "model": str(path)}
            bar.update(1)
    return curve


# ---------------------------------------------------------------------------------------------------------------
# One seed, several seeds


def variant_unit(out: Path, sp: StudyPlan, name: str, seed: int, shared: dict, rank: int, resume: bool,
                 console: DemoConsole | None = None, threads: int | None = None) -> dict:
    """Train and score one variant (or reuse its finished result with `resume`); a top-level function so a
    process pool can run it (`threads`: that worker's torch threads)."""
    if threads is not None:
        torch.set_num_threads(threads)
    console = console or DemoConsole(out / "logs", progress=False)
    variant = VARIANTS[name]
    marker = out / "variants" / name / "study_unit.json"
    fingerprint = _fingerprint(asdict(sp.demo), seed, asdict(variant), rank)
    done = _done(marker, fingerprint) if resume else None
    if done is None:
        files = {k: Path(v) for k, v in shared["files"].items()}
        trained = train_variant(out, sp, variant, seed, shared, rank if name == "lora" else None, console)
        with console.block(f"eval {name}"):
            done = trained | evaluate_variant(out, sp, variant, Path(trained["final_dir"]), files, seed)
        write_json(marker, {"fingerprint": fingerprint, "result": done})
    return done


def _note(console: DemoConsole, seed: int, name: str, done: dict) -> None:
    s = done["scores"]
    console.note(f"seed {seed} {name}: text held-out {s['text_heldout']['accuracy']:.3f}, easy-vqa "
                 f"{s['vqa_test']['accuracy']:.3f} ({done['seconds']:.0f} s training)")


def run_variants(out: Path, sp: StudyPlan, names: list[str], seed: int, shared: dict, rank: int,
                 console: DemoConsole, resume: bool, workers: int) -> dict[str, dict]:
    """Every trained variant of one seed: one after the other, or `workers` at a time in separate processes with
    one torch thread each (on 2 cores two 1-thread runs finish sooner than two 2-thread runs in turn; their
    progress goes to the seed's log files only)."""
    trained = [n for n in names if VARIANTS[n].family != "interp"]
    if workers <= 1:
        results = {}
        for name in trained:
            results[name] = variant_unit(out, sp, name, seed, shared, rank, resume, console)
            _note(console, seed, name, results[name])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    order = sorted(trained, key=lambda n: VARIANTS[n].family != "wings")  # the longer Wings runs first
    results = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {pool.submit(variant_unit, out, sp, name, seed, shared, rank, resume, None, 1): name
                for name in order}
        for job in as_completed(jobs):
            results[jobs[job]] = job.result()
            _note(console, seed, jobs[job], results[jobs[job]])
    return {name: results[name] for name in trained}


def run_study_seed(out: Path, sp: StudyPlan, seed: int, names: list[str], console: DemoConsole,
                   resume: bool = False, workers: int = 1) -> dict:
    """Every variant in `names` for one seed, in out/ (see the module docstring); returns the seed's results."""
    out.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    t0 = time.perf_counter()
    base_print = _fingerprint(asdict(sp.demo), seed)
    shared = _done(out / "shared.json", base_print) if resume else None
    if shared is None:
        shared = train_shared(out, sp, seed, console)
        with console.block("evaluation"):
            shared["base_scores"] = score_model(out / "base_llm", "base", {k: Path(v) for k, v in
                                                                             shared["files"].items()}, with_vqa=False)
        write_json(out / "shared.json", {"fingerprint": base_print, "result": shared})
    else:
        console.note(f"seed {seed}: reusing the shared stages in {out}")
    with console.block("lora_rank"):  # (loading two models: their load bars go to the log)
        rank, lora_params, learner_params = lora_rank_for(shared)
    variants = run_variants(out, sp, names, seed, shared, rank, console, resume, workers)
    curve = None
    if "interp" in names:
        files = {k: Path(v) for k, v in shared["files"].items()}
        curve = interpolation_curve(out, sp, shared, variants["llava"], files, console)
    earlier_seconds = []
    if resume:
        variants, curve, earlier_seconds = _keep_earlier(out, asdict(sp.demo), variants, curve)
    results = {"seed": seed, "mode": sp.mode, "plan": asdict(sp.demo), "threads": torch.get_num_threads(),
               "workers": workers, "base": {"scores": shared["base_scores"], **shared["base_llm"]},
               "vision": shared["vision"], "shared_stages": shared["stages"], "shared_timings": shared["timings"],
               "variants": variants, "interp": curve, "files": shared["files"],
               "lora": {"rank": rank, "params": lora_params, "learner_params": learner_params},
               "seconds": round(time.perf_counter() - t0, 1), "earlier_runs_seconds": earlier_seconds}
    write_json(out / "results.json", results)
    return results


def _keep_earlier(out: Path, plan: dict, variants: dict, curve: dict | None) -> tuple[dict, dict | None, list]:
    """With `resume`, a run of some variants keeps in the seed's results.json the variants (and the interpolation
    curve) an earlier run with the same plan finished there, so a seed can be completed a few variants at a time
    without losing the others from its results. Returns (variants, curve, the earlier runs' wall seconds)."""
    path = out / "results.json"
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        earlier = None
    if not earlier or earlier.get("plan") != json.loads(json.dumps(plan)):
        return variants, curve, []
    before = earlier.get("variants", {})
    merged = {n: variants[n] if n in variants else before[n] for n in VARIANTS if n in variants or n in before}
    # The curve mixes toward `llava`: an earlier curve stands only if `llava` is the one it was computed from.
    if curve is None and earlier.get("interp") and merged.get("llava") == before.get("llava"):
        curve = earlier["interp"]
    return merged, curve, [*earlier.get("earlier_runs_seconds", []), earlier.get("seconds")]


def run_study(out_dir: str | Path, mode: str = "full", seeds: list[int] | None = None,
              variants: list[str] | None = None, progress: bool = True, resume: bool = False,
              workers: int = 1) -> dict:
    """The study over `seeds`: every seed in out_dir/seed-N/, then the summary, table, plots and report."""
    from .study_report import write_outputs

    seeds = list(seeds if seeds is not None else [0])
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    names = list(variants or VARIANTS)
    sp = study_plan(mode)
    out = Path(out_dir)
    console = DemoConsole(out / "logs", progress=progress)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    per_seed = []
    for seed, seed_console in seed_consoles(out, seeds, console, progress):
        per_seed.append(run_study_seed(out / f"seed-{seed}", copy.deepcopy(sp), seed, names, seed_console, resume,
                                       workers))
    timings = {"total": round(time.perf_counter() - t0, 1), "cpu_total": round(_cpu_seconds() - cpu0, 1),
               "per_seed": [r["seconds"] for r in per_seed], "threads": torch.get_num_threads(), "workers": workers}
    return write_outputs(out, sp, names, per_seed, timings)


def rebuild_report(out_dir: str | Path) -> dict:
    """Rewrite the summary outputs (results.json, table.md, REPORT.md, plots) from the seed-N/results.json files
    already in out_dir, without training or scoring anything (e.g. after code changes to the report)."""
    from .study_report import write_outputs

    out = Path(out_dir)
    per_seed = sorted((json.loads(p.read_text()) for p in out.glob("seed-*/results.json")), key=lambda r: r["seed"])
    if not per_seed:
        raise FileNotFoundError(f"{out} holds no seed-N/results.json to report on")
    names = [n for n in VARIANTS if any(n in r["variants"] or (n == "interp" and r.get("interp")) for r in per_seed)]
    sp = study_plan("quick" if per_seed[0]["mode"] == "quick" else "full")
    for r in per_seed:  # profiles from before `router_profile` measured the spread within a layer: measure again
        files = {k: Path(v) for k, v in r.get("files", {}).items()} or _seed_files(out / f"seed-{r['seed']}")
        for model in r["variants"].values():
            router = model.get("router")
            if router and "spread_pooled" not in router["profile"]:
                router["profile"] = profile_router(sp, Path(model["final_dir"]), files)
    # Wall time per seed, over every (resumed) run the seed was completed in; the last run's own timings would
    # cover only the seeds it ran.
    walls = [r["seconds"] + sum(s for s in r.get("earlier_runs_seconds", []) if s) for r in per_seed]
    timings = {"total": round(sum(walls), 1), "cpu_total": None, "per_seed": walls, "rebuilt": True,
               "threads": per_seed[0]["threads"], "workers": per_seed[0].get("workers", 1)}
    return write_outputs(out, sp, names, per_seed, timings)


def _seed_files(seed_dir: Path) -> dict[str, Path]:
    """A seed's evaluation files (results.json written before they were recorded in it)."""
    return {name: seed_dir / "data" / f"{name}.jsonl" for name in ("text_heldout", "text_seen", "vqa_test")}

