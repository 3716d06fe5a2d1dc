"""The demo's measurements beyond accuracy: IIT configurations, MLLM-LAWS, plots and REPORT.md.

Everything reads the files `pipeline.run_demo` wrote (data/, the stage dirs) and the scores it computed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ..evaluation import evaluate_task, load_eval_model, load_task
from ..evaluation.iit import build_iit_file
from ..evaluation.io import save_figure, write_text
from ..evaluation.laws import compute_laws
from ..evaluation.plots import accuracy_bars, laws_curves
from .budget import plan

IIT_CONFIGS = ("T", "TT", "TTT", "TTV", "TV", "V")
QUESTION_TYPES = ("yesno", "colour", "shape")


def run_iit(out: Path, files: dict[str, Path], models: dict[str, Path], per_config: int, seed: int,
            done=None) -> dict:
    """Build the six IIT configurations from the held-out text pool and the easy-vqa test pool; score each MLLM."""
    iit_file = out / "data" / "iit.jsonl"
    build_iit_file(files["text_heldout"], files["vqa_test"], ",".join(IIT_CONFIGS), per_config, seed, iit_file)
    task = load_task(iit_file)
    results = {}
    for label, path in models.items():
        em = load_eval_model(path, device="cpu", label=label)
        metrics = evaluate_task(em, task, batch_size=32, progress=False).metrics()
        results[label] = {"overall": {k: metrics[k] for k in ("accuracy", "ci95", "correct", "n")},
                          "per_config": metrics["per_config"]}
        if done is not None:
            done(1)
    return results


def run_laws(out: Path, files: dict[str, Path], models: dict[str, Path], max_items: int, done=None) -> dict:
    """MLLM-LAWS per layer and the attention shift (all query tokens, mean over heads) on easy-vqa test items."""
    task = load_task(files["vqa_test"])
    results = {}
    for label, path in models.items():
        em = load_eval_model(path, device="cpu", label=label)
        summary = compute_laws(em, task, max_items=max_items, batch_size=16, progress=False)
        summary.pop("items")
        results[label] = summary
        if done is not None:
            done(1)
    return results


def loss_plot(stages: dict, path: Path) -> Path:
    fig = Figure(figsize=(9.0, 3.4))
    for k, stage_no in enumerate((1, 2)):
        ax = fig.add_subplot(1, 2, k + 1)
        for family in ("llava", "wings"):
            losses = stages[f"{family}_stage{stage_no}"]["losses"]
            ax.plot([s for s, _ in losses], [v for _, v in losses], label=family, linewidth=1)
        ax.set_title(f"stage {stage_no} training loss", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def make_plots(out: Path, results: dict) -> dict[str, str]:
    scores, plots = results["scores"], {}
    labels = list(scores)
    series = {label: [scores[label].get(t) for t in ("text_heldout", "vqa_test")] for label in labels}
    plots["forgetting"] = accuracy_bars(["text-only (held-out)", "easy-vqa test"], series, out / "forgetting.png",
                                        title="Text-only knowledge kept, and easy-vqa learned")
    iit = results["iit"]
    plots["iit"] = accuracy_bars(list(IIT_CONFIGS), {m: [iit[m]["per_config"].get(c) for c in IIT_CONFIGS]
                                                     for m in iit}, out / "iit.png",
                                 title="IIT-style dialogues: accuracy on the last turn, per configuration")
    for label, summary in results["laws"].items():
        shift = summary["attention_shift"]
        plots[f"laws_{label}"] = laws_curves(summary["laws_mean"], out / f"laws_{label}.png",
                                             title=f"{label}: MLLM-LAWS (attention shift {shift:.3f})")
    plots["losses"] = loss_plot(results["stages"], out / "losses.png")
    return {k: Path(v).name for k, v in plots.items()}


def _fmt(stat: dict | None) -> str:
    if not stat:
        return "-"
    lo, hi = stat["ci95"]
    return f"{stat['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]"


def summary_table(results: dict) -> str:
    """Markdown tables: text-only, easy-vqa, IIT and attention shift per model; easy-vqa per question type; IIT
    per configuration."""
    scores, iit, laws = results["scores"], results["iit"], results["laws"]
    rows = ["| model | text-only held-out | text-only seen | easy-vqa test | IIT (all) | attention shift |",
            "|---|---|---|---|---|---|"]
    for label in scores:
        shift = laws.get(label, {}).get("attention_shift")
        rows.append(f"| {label} | {_fmt(scores[label].get('text_heldout'))} | {_fmt(scores[label].get('text_seen'))} "
                    f"| {_fmt(scores[label].get('vqa_test'))} | {_fmt(iit.get(label, {}).get('overall'))} "
                    f"| {'-' if shift is None else f'{shift:.3f}'} |")
    rows += ["", "| easy-vqa per question type | yes/no | colour | shape | yes/no answered 'yes' |",
             "|---|---|---|---|---|"]
    for label in iit:
        vqa = scores[label]["vqa_test"]
        per = vqa["per_category"]
        rows.append(f"| {label} | " + " | ".join(f"{per[c]:.3f}" if c in per else "-" for c in QUESTION_TYPES)
                    + (f" | {vqa['yes_rate']:.2f} |" if "yes_rate" in vqa else " | - |"))
    rows += ["", "| IIT configuration | " + " | ".join(iit) + " |", "|---|" + "---|" * len(iit)]
    for config in IIT_CONFIGS:
        rows.append(f"| {config} | " + " | ".join(_fmt(iit[m]["per_config"].get(config)) for m in iit) + " |")
    return "\n".join(rows)


def stage2_data(results: dict) -> str:
    ratio = results.get("text_mix_ratio", 0.0)
    if ratio:
        return f", plus text-only records replayed from the base LLM's data as {ratio:.0%} of the mix"
    return " only (the image-only ablation)"


def command(out: Path, results: dict, seeds: int = 1) -> str:
    """The `wings demo` command line that reproduces `results` (mode, seed(s), stage-2 length, data mix)."""
    parts = ["wings demo"] + (["--quick"] if results["mode"] == "quick" else []) + [f"--out {out}"]
    if results["seed"]:
        parts.append(f"--seed {results['seed']}")
    if seeds > 1:
        parts.append(f"--seeds {seeds}")
    default = plan(results["mode"]).stages["wings_stage2"].steps
    steps = results["plan"]["stages"]["wings_stage2"]["steps"]
    if steps != default:
        parts.append(f"--stage2-steps {steps}")
    if not results.get("text_replay", False):
        parts.append("--no-text-replay")
    return " ".join(parts)


def write_report(out: Path, results: dict) -> Path:
    base = results["base_llm"]
    vision = results["vision"]
    text = f"""# Wings demo report ({results['mode']} mode, seed {results['seed']})

Produced by `{command(out, results)}` in
{results['timings']['total']:.0f} s on this machine (CPU only, {results.get('threads', '?')} torch threads, CPU time
{results['timings'].get('cpu_total', float('nan')):.0f} s). Accuracies with 95% Wilson intervals.

{summary_table(results)}

## What was measured

- **Base LLM**: a {base['params'] / 1e6:.2f}M-parameter Qwen2-architecture model trained from scratch on
  generated text-only facts (made-up countries' capitals, people's favourite colours/shapes, shape facts,
  single-digit addition) in ChatML. Text-only accuracy is multiple choice by log-likelihood on held-out
  phrasings of the same facts (chance 0.25) and on seen phrasings.
- **Vision encoder**: a tiny SigLIP-architecture encoder, pretrained here with supervised shape/colour heads on
  easy-vqa training images (test accuracy shape {vision['test_accuracy']['shape']:.2f}, colour
  {vision['test_accuracy']['colour']:.2f}).
- **Two MLLMs from the same base**: the LLaVA-style baseline (llava_stage1: projector on captions; llava_stage2:
  projector + full LLM on easy-vqa questions{stage2_data(results)}) and Wings (wings_stage1: projector +
  visual learners; wings_stage2: LLM at a lower rate, projector, both learners and the router, same data). The
  exact configs are in each stage directory's `train_config.yaml`; sizes and learning rates in `results.json`
  (`plan`).
- **easy-vqa**: real 64x64 shape images from the `easy-vqa` package (the tiny encoder sees them at
  {vision['spec']['image_size']}x{vision['spec']['image_size']}), multiple choice over the answers of the
  question's type (yes/no, colours, shapes).
- **IIT**: dialogues in the paper's six configurations built from the two held-out pools; earlier turns are
  context with their gold answers, the last turn is scored.
- **MLLM-LAWS**: attention mass per layer on text before the image, the image and text after it (all query
  tokens, mean over heads); attention shift = 1 - mean Pearson(LAWS_before, LAWS_after). With a
  {results['laws'][next(iter(results['laws']))]['n_layers']}-layer LLM each Pearson correlation has that many
  points: a correlation over so few points cannot carry a conclusion about the attention shift; it is
  reported as measured. (An 8-layer base LLM trained with the same recipe plateaued at a loss of 0.63 against
  ~0.13 and knew far fewer facts, 0.52 held-out / 0.62 seen on seed 0, so the demo keeps 4 layers.)
- **Per question type**: yes/no needs the question's word and the image together at the answer token; colour
  and shape answers can be read off the image alone. "yes/no answered 'yes'" is how often the model picked
  "yes" (the test items are about half yes, half no): a model that never learned yes/no sits near chance with
  this rate far from 0.5, or close to it with near-equal log-probabilities.

## What this does and does not show

Tiny models, synthetic text knowledge, real images, a few minutes of CPU training. The numbers show how
each recipe trades the base LLM's text-only knowledge against what it learns from images *in this setting*;
they say nothing about large models or real benchmarks. Differences inside overlapping intervals are noise,
and one seed is one draw: `wings demo --seeds 3` gives the mean and range (figures move by several points
between seeds, and runs on another machine are not bit-identical).

Plots: {', '.join(f'`{v}`' for v in results['plots'].values())}.
"""
    return write_text(out / "REPORT.md", text)
