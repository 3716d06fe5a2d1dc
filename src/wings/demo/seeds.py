"""The demo over several seeds: every seed's full run in its own folder, then mean and range of every cell.

    run_seeds(out_dir, mode, seeds=[0, 1, 2]) -> summary (also out_dir/results.json and out_dir/REPORT.md)

A tiny model trained for minutes from scratch lands in visibly different places from one seed to the next (and
from one machine to the next: float kernels and thread counts differ, so no run is bit-reproducible elsewhere),
so the figures worth quoting are a mean with its range, next to every seed's own row.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..evaluation.io import write_json, write_text
from .analysis import QUESTION_TYPES, command, stage2_data
from .console import DemoConsole, seed_consoles

# (key in the summary, label in the tables, how to read it from one seed's results)
CELLS = {
    "text_heldout": ("text-only held-out", lambda r, m: r["scores"][m]["text_heldout"]["accuracy"]),
    "text_seen": ("text-only seen", lambda r, m: r["scores"][m]["text_seen"]["accuracy"]),
    "vqa_test": ("easy-vqa test", lambda r, m: r["scores"][m]["vqa_test"]["accuracy"]),
    **{f"vqa_{t}": (f"easy-vqa {t}", lambda r, m, t=t: r["scores"][m]["vqa_test"]["per_category"][t])
       for t in QUESTION_TYPES},
    "iit": ("IIT (all)", lambda r, m: r["iit"][m]["overall"]["accuracy"]),
    "attention_shift": ("attention shift", lambda r, m: r["laws"][m]["attention_shift"]),
}
MODELS = ("base", "llava", "wings")


def _cell(results: dict, model: str, key: str) -> float | None:
    try:
        value = CELLS[key][1](results, model)
    except (KeyError, TypeError):
        return None  # e.g. the base LLM has no easy-vqa score
    return None if value is None else float(value)


def aggregate(per_seed: list[dict]) -> dict:
    """{model: {cell: {"mean", "min", "max", "values"}}} over the seeds' results (cells a model lacks are left out)."""
    summary: dict[str, dict] = {}
    for model in MODELS:
        for key in CELLS:
            values = [_cell(r, model, key) for r in per_seed]
            if any(v is None for v in values) or not values:
                continue
            summary.setdefault(model, {})[key] = {"mean": sum(values) / len(values), "min": min(values),
                                                  "max": max(values), "values": values}
    return summary


def _span(stat: dict | None) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.3f} [{stat['min']:.2f}-{stat['max']:.2f}]"


def seeds_table(summary: dict, n_seeds: int) -> str:
    """Markdown: mean [min-max] over the seeds per model and cell."""
    keys = ("text_heldout", "text_seen", "vqa_test", "iit", "attention_shift")
    rows = [f"| model (mean [range], {n_seeds} seeds) | " + " | ".join(CELLS[k][0] for k in keys) + " |",
            "|---|" + "---|" * len(keys)]
    for model, cells in summary.items():
        rows.append(f"| {model} | " + " | ".join(_span(cells.get(k)) for k in keys) + " |")
    rows += ["", "| easy-vqa per question type | " + " | ".join(QUESTION_TYPES) + " |",
             "|---|" + "---|" * len(QUESTION_TYPES)]
    for model, cells in summary.items():
        if "vqa_test" in cells:
            rows.append(f"| {model} | " + " | ".join(_span(cells.get(f"vqa_{t}")) for t in QUESTION_TYPES) + " |")
    return "\n".join(rows)


def per_seed_table(per_seed: list[dict]) -> str:
    """Markdown: one row per seed and model, with easy-vqa per question type and the yes/no answer bias."""
    head = ["seed", "model", "text held-out", "easy-vqa", "yes/no", "colour", "shape", "answers 'yes'", "IIT",
            "shift"]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in per_seed:
        for model in MODELS:
            if model not in r["scores"]:
                continue

            def f(key: str, model: str = model, r: dict = r) -> str:
                v = _cell(r, model, key)
                return "-" if v is None else f"{v:.3f}"

            yes = r["scores"][model].get("vqa_test", {}).get("yes_rate")
            rows.append(f"| {r['seed']} | {model} | {f('text_heldout')} | {f('vqa_test')} | {f('vqa_yesno')} | "
                        f"{f('vqa_colour')} | {f('vqa_shape')} | {'-' if yes is None else f'{yes:.2f}'} | "
                        f"{f('iit')} | {f('attention_shift')} |")
    return "\n".join(rows)


def write_seeds_report(out: Path, per_seed: list[dict], summary: dict, seconds: float, cpu_seconds: float) -> Path:
    first = per_seed[0]
    seeds = [r["seed"] for r in per_seed]
    text = f"""# Wings demo report ({first['mode']} mode, seeds {', '.join(map(str, seeds))})

Produced by `{command(out, first, len(seeds))}` in {seconds:.0f} s on this machine (CPU only, CPU time
{cpu_seconds:.0f} s). Stage 2 trains on easy-vqa questions{stage2_data(first)}. Each seed's own report,
plots and models are in `seed-N/`; `results.json` holds every seed's results and this summary.

{seeds_table(summary, len(seeds))}

Every seed:

{per_seed_table(per_seed)}

How to read it: each seed trains the base LLM, the vision encoder and all four stages from scratch, so a cell's
range is how far this recipe's outcome moves with the seed alone. Runs on other machines move further (float
kernels and thread counts differ; no run is bit-reproducible elsewhere), so a difference between the two
models that is smaller than these ranges is not a finding.
"""
    return write_text(out / "REPORT.md", text)


def run_seeds(out_dir: str | Path, mode: str = "quick", seeds: list[int] | None = None, progress: bool = True,
              stage2_steps: int | None = None, text_replay: bool = True) -> dict:
    """`run_demo` for each seed in out_dir/seed-N/, then the summary; returns {"seeds", "per_seed", "summary"}."""
    from .pipeline import _cpu_seconds, run_demo

    seeds = list(seeds or [0])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must differ, got {seeds}")
    out = Path(out_dir)
    console = DemoConsole(out / "logs", progress=progress)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    per_seed = []
    for seed, seed_console in seed_consoles(out, seeds, console, progress):
        per_seed.append(run_demo(out / f"seed-{seed}", mode=mode, seed=seed, stage2_steps=stage2_steps,
                                 text_replay=text_replay, console=seed_console))
    seconds, cpu_seconds = time.perf_counter() - t0, _cpu_seconds() - cpu0
    summary = aggregate(per_seed)
    write_seeds_report(out, per_seed, summary, seconds, cpu_seconds)
    results = {"mode": mode, "seeds": seeds, "text_replay": text_replay, "summary": summary,
               "timings": {"total": round(seconds, 1), "cpu_total": round(cpu_seconds, 1)}, "per_seed": per_seed}
    write_json(out / "results.json", results)
    return results
