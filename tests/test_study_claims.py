"""The study's reading rules on made-up results: paired verdicts, the interpolation curve, seeds that lack a
variant, and the table's cells."""

from __future__ import annotations

import pytest

from wings.demo.study_claims import above_curve, aggregate, claims, curve_text_at, verdict
from wings.demo.study_report import fmt, main_table


def model(text: float, vqa: float, shift: float = 1.0) -> dict:
    return {"scores": {"text_heldout": {"accuracy": text}, "text_seen": {"accuracy": text},
                       "vqa_test": {"accuracy": vqa, "per_category": {"yesno": vqa, "colour": vqa, "shape": vqa},
                                    "yes_rate": 0.5}},
            "iit": {"overall": {"accuracy": 0.5}}, "laws": {"attention_shift": shift}, "trainable": {"llm": 10}}


def seed_result(seed: int, wings_text: float, variants: dict | None = None) -> dict:
    """Base 0.9; the curve runs from (0.5, 0.9) at a = 0 to (0.8, 0.7) at a = 1; LLaVA is its a = 1 end."""
    curve = {f"{a:g}": {"alpha": a, **model(0.9 - 0.2 * a, 0.5 + 0.3 * a)} for a in (0.0, 0.5, 1.0)}
    found = {"llava": model(0.7, 0.8), "wings": model(wings_text, 0.65), **(variants or {})}
    return {"seed": seed, "base": {"scores": {"text_heldout": {"accuracy": 0.9}, "text_seen": {"accuracy": 0.95}}},
            "variants": found, "interp": curve}


def test_curve_is_piecewise_linear_and_flat_beyond_its_ends():
    points = [(0.5, 0.9), (0.65, 0.8), (0.8, 0.7)]
    assert curve_text_at(points, 0.575) == pytest.approx(0.85)
    assert curve_text_at(points, 0.9) == 0.7 and curve_text_at(points, 0.4) == 0.9
    assert curve_text_at([(0.5, 0.9), (0.7, 0.6), (0.6, 0.8)], 0.65) == pytest.approx(0.7)  # the best segment


def test_verdicts_are_paired_by_seed():
    assert verdict([0.01, 0.02, 0.03]) == "held" and verdict([-0.1, -0.2, -0.01]) == "not held"
    assert verdict([0.1, -0.01, 0.2]) == "within noise" and verdict([0.1, 0.2]) == "too few seeds"
    runs = [seed_result(s, text) for s, text in enumerate((0.82, 0.85, 0.81))]  # the curve gives 0.8 at 0.65
    assert above_curve(runs, "wings") == pytest.approx([0.02, 0.05, 0.01])
    found = {c["claim"].split(" (")[0]: c for c in claims(runs)}
    assert found["At equal easy-vqa, Wings keeps more text than full tuning"]["verdict"] == "held"
    assert found["Full tuning forgets text"]["verdict"] == "held"
    assert found["Both learners beat either alone"]["verdict"] == "not measured"
    runs[1]["variants"]["wings"] = model(0.75, 0.65)
    found = {c["claim"].split(" (")[0]: c for c in claims(runs)}
    assert found["At equal easy-vqa, Wings keeps more text than full tuning"]["verdict"] == "within noise"


def test_a_variant_on_fewer_seeds_keeps_its_own_seeds():
    runs = [seed_result(s, 0.8, {"lora": model(0.85, 0.6)} if s < 2 else None) for s in range(3)]
    summary = aggregate(runs)
    assert summary["lora"]["text_heldout"]["seeds"] == [0, 1] and summary["wings"]["vqa_test"]["seeds"] == [0, 1, 2]
    table = main_table(summary, 3)
    assert "(2 seeds)" in table and fmt(summary["wings"]["text_heldout"]) == "0.800 [0.80, 0.80]"
    lora = next(c for c in claims(runs) if c["claim"].startswith("LoRA"))
    assert lora["verdict"] == "too few seeds"  # 2 paired seeds
