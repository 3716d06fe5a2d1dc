"""The study's outputs over all seeds: results.json, table.md, REPORT.md, tradeoff.png and router.png.

`table.md`, the plot's points and results.json's `summary` are all made from the one `aggregate` of the seeds'
results, so they agree by construction (and the tests check that they do).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from ..evaluation.io import save_figure, write_json, write_text
from .study_claims import (
    CELLS,
    QUESTION_TYPES,
    above_curve,
    aggregate,
    claims,
    claims_by_seed_count,
    curve_points,
    span,
    verdict,
)
from .variants import HEADLINE, VARIANTS

PROFILE_KEYS = ("spread", "spread_pooled", "layer_range", "image_text_gap", "type_range")
TABLE_CELLS = ("text_heldout", "text_seen", "vqa_test", "vqa_yesno", "vqa_colour", "vqa_shape", "iit",
               "attention_shift")
ROUTER_KEYS = ("router/w_v_image_tokens", "router/w_v_text_tokens", "router/w_v_text_only", "router/w_v_std",
               "router/w_v_std_in_layer", "router/entropy", "router/logit_gap", "router/grad_norm")


def fmt(stat: dict | None, digits: int = 3) -> str:
    """mean [min, max] over seeds (a single seed: the value alone)."""
    if not stat:
        return "-"
    if len(stat["values"]) == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{stat['min']:.2f}, {stat['max']:.2f}]"


def _label(name: str) -> str:
    if name == "base":
        return "base LLM"
    if name.startswith("interp@"):
        return f"LLaVA interpolated, a = {name.split('@')[1]}"
    return VARIANTS[name].label


def main_table(summary: dict, n_seeds: int) -> str:
    """Markdown: every model's cells, mean [min, max] over the seeds."""
    head = ["model", "what it is"] + [CELLS[k][0] for k in TABLE_CELLS]
    rows = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for name, cells in summary.items():
        if name.startswith("interp@"):
            continue
        seeds = len(cells["text_heldout"]["values"]) if "text_heldout" in cells else n_seeds
        label = _label(name) + (f" ({seeds} seeds)" if seeds != n_seeds else "")
        rows.append(f"| {name} | {label} | " + " | ".join(fmt(cells.get(k)) for k in TABLE_CELLS) + " |")
    curve = [n for n in summary if n.startswith("interp@")]
    if curve:
        rows += ["", f"Interpolation curve (mean [min, max] over {n_seeds} seed(s)):", "",
                 "| a | text held-out | text seen | easy-vqa |", "|---|---|---|---|"]
        for name in curve:
            c = summary[name]
            rows.append(f"| {name.split('@')[1]} | {fmt(c.get('text_heldout'))} | {fmt(c.get('text_seen'))} | "
                        f"{fmt(c.get('vqa_test'))} |")
    return "\n".join(rows)


def curve_table(per_seed_results: list[dict], names: list[str]) -> tuple[str, dict]:
    """Markdown + data: each variant's held-out text above (+) or below (-) the interpolation curve."""
    data, rows = {}, ["| variant | text above the curve at its easy-vqa, mean [min, max] | reading |", "|---|---|---|"]
    for name in names:
        if name in ("interp", "llava") or not any(name in r["variants"] for r in per_seed_results):
            continue
        excess = above_curve(per_seed_results, name)
        if excess is None:
            continue
        reading = {"held": "above", "not held": "below", "within noise": "within noise"}.get(verdict(excess),
                                                                                           verdict(excess))
        data[name] = {"excess": excess, "reading": reading}
        rows.append(f"| {name} | {span(excess)} | {reading} |")
    return "\n".join(rows), data


def router_summary(per_seed_results: list[dict]) -> dict[str, dict]:
    """Per variant with a router: training diagnostics (each figure's first logged step, and the mean of the last
    fifth of the logged steps that have it) and the after-training profile, mean over seeds."""
    out: dict[str, dict] = {}
    names = [n for n in VARIANTS if any(n in r["variants"] for r in per_seed_results)]
    for name in names:
        runs = [r["variants"][name]["router"] for r in per_seed_results if "router" in r["variants"].get(name, {})]
        if not runs:
            continue
        first, last = {}, {}
        for run in runs:
            for key in ROUTER_KEYS:  # text-only steps are their own batches: each key over the steps that have it
                rows = [row[key] for row in run["diagnostics"] if key in row]
                if rows:
                    tail = rows[-max(1, len(rows) // 5):]
                    first.setdefault(key, []).append(rows[0])
                    last.setdefault(key, []).append(sum(tail) / len(tail))
        profile = [run["profile"] for run in runs]
        types = sorted({t for p in profile for t in p["per_type"]})
        out[name] = {
            "start": {k: _mean(v) for k, v in first.items()}, "end": {k: _mean(v) for k, v in last.items()},
            **{key: [p.get(key) for p in profile] for key in PROFILE_KEYS},
            "per_type": {t: {kind: _mean([p["per_type"].get(t, {}).get(kind) for p in profile])
                             for kind in ("image_tokens", "text_tokens", "last_token")} for t in types},
            "per_layer": {layer: {t: _mean([p["per_layer"].get(layer, {}).get(t) for p in profile]) for t in types}
                          for layer in sorted(profile[0]["per_layer"], key=int)}}
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _stat(values: list | None) -> str:
    values = [v for v in values or [] if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def router_tables(routers: dict[str, dict]) -> str:
    if not routers:
        return "(no variant with a learned router was run)"
    rows = ["| variant | when | w_v image tokens | w_v text tokens | w_v text-only | w_v std (layers pooled) | "
            "w_v std in a layer | entropy | logit gap | grad norm |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in routers.items():
        for when in ("start", "end"):
            rows.append(f"| {name} | {when} | " + " | ".join(_num(r[when].get(k), 4) for k in ROUTER_KEYS) + " |")
    rows += ["", "After training, on easy-vqa test prompts (mean [min, max] over seeds): the token-wise spread (std of "
             "w_v over the tokens of a prompt's layer, averaged over layers), the same with layers pooled, the range "
             "of the layers' mean w_v, image-token minus text-token w_v, and the range over question types of the "
             "last prompt token's w_v:", "",
             "| variant | spread in a layer | spread, layers pooled | layer range | image - text tokens | "
             "question-type range |", "|---|---|---|---|---|---|"]
    for name, r in routers.items():
        rows.append(f"| {name} | " + " | ".join(_stat(r.get(k)) for k in PROFILE_KEYS) + " |")
    rows += ["", "w_v per question type at the image tokens / the text tokens / the last prompt token (mean over "
             "seeds):", "", "| variant | " + " | ".join(QUESTION_TYPES) + " | text-only |",
             "|---|" + "---|" * (len(QUESTION_TYPES) + 1)]
    for name, r in routers.items():
        cells = []
        for t in (*QUESTION_TYPES, "text-only"):
            kinds = r["per_type"].get(t, {})
            cells.append(" / ".join(_num(kinds.get(k)) for k in ("image_tokens", "text_tokens", "last_token")))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    layer_rows = ["", "Mean w_v per layer and question type (all tokens of the prompt):", "",
                  "| variant | layer | " + " | ".join((*QUESTION_TYPES, "text-only")) + " |",
                  "|---|---|" + "---|" * (len(QUESTION_TYPES) + 1)]
    for name, r in routers.items():
        for layer, per in r["per_layer"].items():
            layer_rows.append(f"| {name} | {layer} | " + " | ".join(_num(per.get(t)) for t in
                                                                     (*QUESTION_TYPES, "text-only")) + " |")
    return "\n".join(rows + layer_rows)


# ---------------------------------------------------------------------------------------------------------------
# Plots


def tradeoff_plot(per_seed_results: list[dict], summary: dict, path: Path) -> tuple[Path, dict]:
    """Held-out text kept (y) against easy-vqa learned (x): every variant's seeds and mean, the interpolation
    curve (each seed's, and the mean over seeds), the base LLM as a line. Returns the plotted means too."""
    fig = Figure(figsize=(8.6, 5.6))
    ax = fig.add_subplot()
    points: dict[str, dict] = {}
    for r in per_seed_results:
        pts = curve_points(r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.6", linewidth=0.8, alpha=0.5)
    curve = [n for n in summary if n.startswith("interp@")]
    if curve:
        xs = [summary[n]["vqa_test"]["mean"] for n in curve]
        ys = [summary[n]["text_heldout"]["mean"] for n in curve]
        ax.plot(xs, ys, color="0.25", marker="s", markersize=4, linewidth=1.6,
                label="LLaVA interpolated toward its stage-1 weights (a = 0 ... 1)")
        points["interpolation"] = {"x": xs, "y": ys}
    if "base" in summary:
        base = summary["base"]["text_heldout"]["mean"]
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"base LLM ({base:.3f})")
        points["base"] = {"y": base}
    cmap = [colormaps["tab20"](i) for i in (*range(0, 20, 2), *range(1, 20, 2))]  # 20 distinct colours
    markers = {"llava": "o", "wings": "^"}
    for k, (name, cells) in enumerate((n, c) for n, c in summary.items() if n in VARIANTS):
        if "vqa_test" not in cells:
            continue
        color, marker = cmap[k % len(cmap)], markers.get(VARIANTS[name].family, "o")
        xs, ys = cells["vqa_test"]["values"], cells["text_heldout"]["values"]
        ax.scatter(xs, ys, color=color, marker=marker, s=14, alpha=0.35, linewidths=0)
        mx, my = cells["vqa_test"]["mean"], cells["text_heldout"]["mean"]
        ax.scatter([mx], [my], color=color, marker=marker, s=70, edgecolors="black", linewidths=0.6, label=name)
        ax.annotate(name, (mx, my), textcoords="offset points", xytext=(5, 4), fontsize=7)
        points[name] = {"x": mx, "y": my}
    ax.set_xlabel("easy-vqa test accuracy (learned)")
    ax.set_ylabel("text-only held-out accuracy (kept)")
    n = len(per_seed_results)
    ax.set_title(f"What each recipe keeps and learns ({n} seed{'s' if n > 1 else ''}: small = one seed, "
                 "large = mean)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_figure(fig, path), points


def router_plot(per_seed_results: list[dict], routers: dict[str, dict], path: Path) -> Path | None:
    """Left: w_v on image and text tokens during training (mean over seeds) per learned-router variant (the fixed
    and modality modes are flat by construction). Right: the released recipe's w_v per layer and question type
    after training."""
    learned = [n for n in routers if VARIANTS[n].learned_router]
    if not learned:
        return None
    fig = Figure(figsize=(10.0, 3.8))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for k, name in enumerate(learned):
        for key, style in (("router/w_v_image_tokens", "-"), ("router/w_v_text_tokens", ":")):
            by_step: dict[int, list[float]] = {}
            for r in per_seed_results:
                for row in r["variants"].get(name, {}).get("router", {}).get("diagnostics", []):
                    if key in row:
                        by_step.setdefault(row["step"], []).append(row[key])
            steps = sorted(by_step)
            left.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], style, color=f"C{k}", linewidth=1,
                      label=f"{name} ({'image' if 'image' in key else 'text'} tokens)")
    left.axhline(0.5, color="black", linewidth=0.6)
    left.set_xlabel("stage-2 step")
    left.set_ylabel("router visual weight w_v")
    left.set_title("w_v during training (mean over seeds)", fontsize=9)
    left.legend(fontsize=6)
    left.grid(alpha=0.3)
    name = "wings" if "wings" in learned else learned[0]
    per_layer = routers[name]["per_layer"]
    layers = list(per_layer)
    for k, t in enumerate((*QUESTION_TYPES, "text-only")):
        right.plot(layers, [per_layer[layer].get(t) for layer in layers], marker="o", label=t, color=f"C{k}")
    right.axhline(0.5, color="black", linewidth=0.6)
    right.set_xlabel("layer")
    right.set_title(f"{name}: w_v per layer and question type after training", fontsize=9)
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Report


def command(out: Path, mode: str, seeds: list[int], names: list[str]) -> str:
    parts = ["wings study"] + (["--quick"] if mode == "quick" else []) + [f"--out {out}", f"--seeds {len(seeds)}"]
    if seeds[0]:
        parts.append(f"--seed {seeds[0]}")
    if names != list(VARIANTS):
        parts.append(f"--variants {','.join(names)}")
    return " ".join(parts)


def produced_by(cmd: str, out: Path, timings: dict) -> str:
    """The report's line on what ran and how long it took."""
    per_seed = ", ".join(f"{s:.0f}" for s in timings["per_seed"])
    if timings.get("rebuilt"):
        return (f"Rebuilt by `wings study --report-only --out {out}` from the seed-N/results.json files; the seeds' "
                f"runs took {timings['total']:.0f} s of wall time ({per_seed} s per seed, adding up the runs a seed "
                f"was completed in; {timings['threads']} torch thread(s), {timings.get('workers', 1)} worker(s))")
    return (f"Produced by `{cmd}` in {timings['total']:.0f} s ({per_seed} s per seed; CPU time "
            f"{timings['cpu_total']:.0f} s; {timings['threads']} torch thread(s))")


def write_outputs(out: Path, sp, names: list[str], per_seed_results: list[dict], timings: dict) -> dict:
    """results.json, table.md, tradeoff.png, router.png and REPORT.md; returns the results."""
    seeds = [r["seed"] for r in per_seed_results]
    summary = aggregate(per_seed_results)
    table = main_table(summary, len(seeds))
    curve_md, curve = curve_table(per_seed_results, names)
    found = claims(per_seed_results)
    sweep = claims_by_seed_count(per_seed_results)
    routers = router_summary(per_seed_results)
    plot, points = tradeoff_plot(per_seed_results, summary, out / "tradeoff.png")
    rplot = router_plot(per_seed_results, routers, out / "router.png")
    write_text(out / "table.md", table + "\n")
    cmd = command(out, sp.mode, seeds, names)
    claim_rows = ["| claim | verdict | deciding figure (per-seed differences, mean [min, max]) |", "|---|---|---|"]
    claim_rows += [f"| {c['claim']} | **{c['verdict']}** | {c['figure']} |" for c in found]
    sweep_rows = ["| claim | " + " | ".join(f"{k} seeds" for k in sweep) + " |", "|---|" + "---|" * len(sweep)]
    for i, c in enumerate(found):
        sweep_rows.append(f"| {c['claim'][:60]} | " + " | ".join(v[i] for v in sweep.values()) + " |")
    lora = per_seed_results[0]["lora"]
    text = f"""# Wings study ({sp.mode} mode, seeds {', '.join(map(str, seeds))})

{produced_by(cmd, out, timings)}. Per seed the base LLM, the
vision encoder and both stage-1 models are trained once and shared by every variant; each variant trains its own
stage 2 on the same data with the same seed. Cells: mean [min, max] over the seeds. LoRA rank
{lora['rank']} ({lora['params']} weights) matches Wings' two learners ({lora['learner_params']} weights).

{table}

## Above or below the interpolation curve

The curve mixes the LLaVA stage-1 model (the base LLM's weights, projector aligned) and the tuned LLaVA (6%
replay) weight by weight: a = 0, 0.25, 0.5, 0.75, 1. A method matters if it keeps more text than the curve at
the same easy-vqa; per seed, each variant is compared with that seed's own curve.

{curve_md}

## The paper's claims, one by one

Verdicts: held = the claimed sign on every seed; not held = the opposite sign on every seed; within noise = the
seeds disagree (fewer than 3 seeds: too few).

{chr(10).join(claim_rows)}

How the verdicts move as seeds are added (the first k seeds):

{chr(10).join(sweep_rows)}

## The router

Training diagnostics (router_diagnostics.jsonl of each run; "start" = the first logged step that has the figure,
"end" = the mean of the last fifth of those steps; text-only samples come in their own batches; entropy in nats,
ln 2 = 0.693 is an even mix; the spread and entropy are over the tokens of image samples):

{router_tables(routers)}

Routing counts as token-wise when the spread in a layer (standard deviation of w_v over the tokens of an image
prompt at one layer, averaged over layers) is at least 0.1.

Plots: `tradeoff.png`{', `router.png`' if rplot else ''}. Every seed's models, logs and results: `seed-N/`.
"""
    write_text(out / "REPORT.md", text)
    results = {"mode": sp.mode, "seeds": seeds, "variants": names, "headline": [n for n in HEADLINE if n in names],
               "summary": summary, "above_curve": curve, "claims": found, "claims_by_seed_count": sweep,
               "router": routers, "plot": {"tradeoff": plot.name, "router": rplot.name if rplot else None,
                                           "points": points},
               "table": table, "timings": timings, "per_seed": per_seed_results}
    write_json(out / "results.json", results)
    return results
