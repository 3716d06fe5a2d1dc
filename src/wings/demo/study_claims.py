"""The study's readings: per-seed cells, the interpolation curve a method must beat, and the paper's claims.

Every comparison is paired by seed (the variants of one seed share the base LLM, the encoder, stage 1 and the
data), and a claim's verdict is a rule on the per-seed differences, never on means alone:

    held          the difference has the claimed sign on every seed
    not held      it has the opposite sign on every seed
    within noise  the seeds disagree
    too few seeds fewer than MIN_SEEDS seeds

The correlation claim uses a Pearson r over every (variant, seed) point and its 95% interval (Fisher z): held if
the interval lies below 0 (less attention shift, more text kept), not held if above, within noise otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

MIN_SEEDS = 3
QUESTION_TYPES = ("yesno", "colour", "shape")

# cell -> (column title, how to read it from one model's result in a seed's results.json)
CELLS: dict[str, tuple[str, Callable[[dict], float | None]]] = {
    "text_heldout": ("text held-out", lambda m: m["scores"]["text_heldout"]["accuracy"]),
    "text_seen": ("text seen", lambda m: m["scores"]["text_seen"]["accuracy"]),
    "vqa_test": ("easy-vqa", lambda m: m["scores"]["vqa_test"]["accuracy"]),
    **{f"vqa_{t}": (t, lambda m, t=t: m["scores"]["vqa_test"]["per_category"][t]) for t in QUESTION_TYPES},
    "yes_rate": ("answers 'yes'", lambda m: m["scores"]["vqa_test"]["yes_rate"]),
    "iit": ("IIT", lambda m: m["iit"]["overall"]["accuracy"]),
    "attention_shift": ("attention shift", lambda m: m["laws"]["attention_shift"]),
    "router_spread": ("router w_v spread", lambda m: m["router"]["profile"]["spread"]),
    "router_w_v": ("router mean w_v", lambda m: m["router"]["profile"]["mean_w_v"]),
    "trainable": ("trainable weights", lambda m: float(sum(m["trainable"].values()))),
}


def cell(model: dict | None, key: str) -> float | None:
    if model is None:
        return None
    try:
        value = CELLS[key][1](model)
    except (KeyError, TypeError):
        return None
    return None if value is None else float(value)


def models_of(seed_result: dict) -> dict[str, dict]:
    """{name: model result} of one seed: base, every variant, and interpolation points as `interp@A`."""
    models = {"base": seed_result["base"], **seed_result["variants"]}
    for key, point in (seed_result.get("interp") or {}).items():
        models[f"interp@{key}"] = point
    return models


def per_seed(per_seed_results: list[dict], name: str, key: str) -> list[float | None]:
    return [cell(models_of(r).get(name), key) for r in per_seed_results]


def aggregate(per_seed_results: list[dict]) -> dict[str, dict[str, dict]]:
    """{model: {cell: {mean, min, max, values, seeds}}} over the seeds that have the cell."""
    names: list[str] = []
    for r in per_seed_results:
        names += [n for n in models_of(r) if n not in names]
    summary: dict[str, dict] = {}
    for name in names:
        for key in CELLS:
            found = [(r["seed"], v) for r, v in zip(per_seed_results, per_seed(per_seed_results, name, key),
                                                     strict=True) if v is not None]
            if found:  # a variant run on fewer seeds (`--variants` on later seeds) keeps the seeds it has
                values = [v for _, v in found]
                summary.setdefault(name, {})[key] = {"mean": sum(values) / len(values), "min": min(values),
                                                     "max": max(values), "values": values,
                                                     "seeds": [s for s, _ in found]}
    return summary


# ---------------------------------------------------------------------------------------------------------------
# The interpolation curve


def curve_points(seed_result: dict) -> list[tuple[float, float]]:
    """(easy-vqa, text held-out) of the seed's interpolation points, in alpha order."""
    curve = seed_result.get("interp") or {}
    points = sorted(curve.values(), key=lambda p: p["alpha"])
    return [(p["scores"]["vqa_test"]["accuracy"], p["scores"]["text_heldout"]["accuracy"]) for p in points]


def curve_text_at(points: list[tuple[float, float]], x: float) -> float:
    """The text accuracy the curve reaches at easy-vqa x: the best of its piecewise-linear segments that span x;
    outside the curve's easy-vqa range, the text of its nearest end (flat extension)."""
    best = None
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        lo, hi = min(x0, x1), max(x0, x1)
        if lo <= x <= hi:
            y = y0 if hi == lo else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            best = y if best is None else max(best, y)
    if best is not None:
        return best
    xs = [p[0] for p in points]
    return points[xs.index(max(xs))][1] if x > max(xs) else points[xs.index(min(xs))][1]


def above_curve(per_seed_results: list[dict], name: str) -> list[float] | None:
    """Per seed that has both: the variant's text held-out minus the curve's at its easy-vqa (> 0: above)."""
    out = []
    for r in per_seed_results:
        model, points = r["variants"].get(name), curve_points(r)
        if model is not None and len(points) >= 2:
            out.append(cell(model, "text_heldout") - curve_text_at(points, cell(model, "vqa_test")))
    return out or None


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


def verdict(diffs: list[float] | None) -> str:
    """The rule in the module docstring, on per-seed differences that should be > 0 if the claim holds."""
    if not diffs or any(d is None for d in diffs):
        return "not measured"
    if len(diffs) < MIN_SEEDS:
        return "too few seeds"
    if all(d > 0 for d in diffs):
        return "held"
    if all(d < 0 for d in diffs):
        return "not held"
    return "within noise"


def combine(verdicts: list[str]) -> str:
    """Several conditions of one claim: held only if all hold, not held if any fails outright."""
    for special in ("not measured", "too few seeds"):
        if special in verdicts:
            return special
    if all(v == "held" for v in verdicts):
        return "held"
    return "not held" if "not held" in verdicts else "within noise"


def diff(per_seed_results: list[dict], a: str, b: str, key: str) -> list[float] | None:
    """Per seed that has both: a's cell minus b's (None when no seed has both)."""
    xs, ys = per_seed(per_seed_results, a, key), per_seed(per_seed_results, b, key)
    out = [x - y for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
    return out or None


def mean_of_tasks(per_seed_results: list[dict], a: str, b: str) -> list[float] | None:
    """Per seed: a minus b on the mean of text held-out and easy-vqa accuracy (one figure for 'better')."""
    t, v = diff(per_seed_results, a, b, "text_heldout"), diff(per_seed_results, a, b, "vqa_test")
    return None if t is None or v is None else [(x + y) / 2 for x, y in zip(t, v, strict=True)]


def span(values: list[float] | None, digits: int = 3) -> str:
    if not values:
        return "-"
    return f"{sum(values) / len(values):+.{digits}f} [{min(values):+.{digits}f}, {max(values):+.{digits}f}]"


def pearson_with_interval(xs: list[float], ys: list[float]) -> tuple[float, float, float] | None:
    """Pearson r and its 95% interval (Fisher z); None with fewer than 4 points or a constant series."""
    n = len(xs)
    if n < 4:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)
    z, half = math.atanh(max(-0.999999, min(0.999999, r))), 1.96 / math.sqrt(n - 3)
    return r, math.tanh(z - half), math.tanh(z + half)


def claims(per_seed_results: list[dict]) -> list[dict]:
    """The paper's testable claims (and the router's), each with its verdict and the figure that decides it."""
    rs = per_seed_results
    out: list[dict] = []

    def add(claim: str, verdict_: str, figure: str, **values) -> None:
        out.append({"claim": claim, "verdict": verdict_, "figure": figure, "values": values})

    forget = diff(rs, "base", "llava", "text_heldout")
    add("Full tuning forgets text (base LLM minus LLaVA, 6% replay, held-out text)", verdict(forget),
        f"base - LLaVA: {span(forget)}", diffs=forget)
    more, less = diff(rs, "llava_r25", "llava", "text_heldout"), diff(rs, "llava", "llava_r0", "text_heldout")
    add("... and forgets more with less replay (25% > 6% > 0% replay, held-out text)",
        combine([verdict(more), verdict(less)]), f"25% - 6%: {span(more)}; 6% - 0%: {span(less)}",
        diffs_25_6=more, diffs_6_0=less)
    excess = above_curve(rs, "wings")
    add("At equal easy-vqa, Wings keeps more text than full tuning (above LLaVA's interpolation curve)",
        verdict(excess), f"Wings' held-out text minus the curve's at Wings' easy-vqa: {span(excess)}", diffs=excess)
    t, v = diff(rs, "lora", "llava", "text_heldout"), diff(rs, "llava", "lora", "vqa_test")
    add("LoRA forgets less but learns less (than full tuning, both at 6% replay)", combine([verdict(t), verdict(v)]),
        f"text: LoRA - LLaVA {span(t)}; easy-vqa: LLaVA - LoRA {span(v)}", text=t, vqa=v)
    vis, txt = mean_of_tasks(rs, "wings", "wings_no_textual"), mean_of_tasks(rs, "wings", "wings_no_visual")
    add("Both learners beat either alone (mean of held-out text and easy-vqa)", combine([verdict(vis), verdict(txt)]),
        f"Wings - visual only: {span(vis)}; Wings - textual only: {span(txt)}", visual_only=vis, textual_only=txt)
    xs, ys = [], []
    for r in rs:
        for model in r["variants"].values():
            shift, text = cell(model, "attention_shift"), cell(model, "text_heldout")
            if shift is not None and text is not None:
                xs.append(shift)
                ys.append(text)
    fit = pearson_with_interval(xs, ys)
    corr = "not measured" if fit is None else ("held" if fit[2] < 0 else "not held" if fit[1] > 0 else "within noise")
    add("Less attention shift goes with more text kept, across variants and seeds (Pearson r < 0)", corr,
        "-" if fit is None else f"r = {fit[0]:+.2f} [{fit[1]:+.2f}, {fit[2]:+.2f}] over {len(xs)} points",
        r=None if fit is None else list(fit), n=len(xs))
    spread = [s for s in per_seed(rs, "wings", "router_spread") if s is not None]
    tokenwise = [s - 0.1 for s in spread] or None
    add("Routing is token-wise (the released recipe's w_v spread over a layer's tokens >= 0.1)", verdict(tokenwise),
        "-" if tokenwise is None else f"w_v spread {sum(spread) / len(spread):.3f} [{min(spread):.3f}, "
        f"{max(spread):.3f}]", spread=spread)
    router = mean_of_tasks(rs, "wings", "wings_fixed")
    add("(not the paper's) The learned router beats a fixed 0.5 mix (mean of held-out text and easy-vqa)",
        verdict(router), f"Wings - fixed 0.5: {span(router)}", diffs=router)
    return out


def claims_by_seed_count(per_seed_results: list[dict]) -> dict[int, list[str]]:
    """{k: each claim's verdict on the first k seeds} for k = MIN_SEEDS .. all: how the reading moves."""
    return {k: [c["verdict"] for c in claims(per_seed_results[:k])]
            for k in range(MIN_SEEDS, len(per_seed_results) + 1)}
