"""`wings study --quick --seeds 1` end to end (~3 min on 2 cores): every variant trains and is scored, and the
table, results.json and the plot agree with each other.

Quick scale trains each stage 2 for 60 steps: nothing is learned well enough to compare recipes, so no learned
outcome is asserted here (the README's figures come from the full study over 5 seeds); what is asserted holds by
construction: exact router weights in the ablation modes, the interpolation's end at the base LLM's weights,
LoRA's size, one diagnostics row per training step, and the outputs agreeing.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from wings.cli import main as wings_main
from wings.demo.study_claims import CELLS
from wings.demo.study_report import TABLE_CELLS, fmt
from wings.demo.variants import VARIANTS


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    capture = pytest.MonkeyPatch()
    import io
    import sys

    printed = io.StringIO()
    capture.setattr(sys, "stdout", printed)
    try:
        code = wings_main(["study", "--quick", "--seeds", "1", "--out", str(out), "--no-progress"])
    finally:
        capture.undo()
    return out, code, printed.getvalue(), json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_study_runs_every_variant(study):
    out, code, printed, results = study
    assert code == 0
    assert "| model | what it is |" in printed and "total time" in printed and f"report: {out}/REPORT.md" in printed
    for name in ("results.json", "table.md", "REPORT.md", "tradeoff.png", "router.png"):
        assert (out / name).stat().st_size > 0, name
    seed = results["per_seed"][0]
    assert set(seed["variants"]) == {n for n, v in VARIANTS.items() if v.family != "interp"}
    assert sorted(float(a) for a in seed["interp"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    steps = seed["plan"]["stages"]["wings_stage2"]["steps"]
    for name, variant in VARIANTS.items():
        if variant.family == "interp":
            continue
        model = seed["variants"][name]
        assert 0.0 <= model["scores"]["vqa_test"]["accuracy"] <= 1.0
        assert set(model["iit"]["per_config"]) == {"T", "TT", "TTT", "TTV", "TV", "V"}
        if variant.has_router:  # one diagnostics row per step (the demo logs every step)
            assert [row["step"] for row in model["router"]["diagnostics"]] == list(range(1, steps + 1)), name
    lora = seed["lora"]
    assert abs(lora["params"] - lora["learner_params"]) <= 0.1 * lora["learner_params"]
    assert sum(seed["variants"]["lora"]["trainable"].get(g, 0) for g in ("lora",)) == lora["params"]


@pytest.mark.slow
def test_ablation_routers_are_exact_after_training(study):
    _, _, _, results = study
    variants = results["per_seed"][0]["variants"]
    fixed = variants["wings_fixed"]["router"]["profile"]
    assert fixed["spread"] == 0.0 and all(v == 0.5 for kinds in fixed["per_type"].values() for v in kinds.values())
    modality = variants["wings_modality"]["router"]["profile"]["per_type"]
    assert all(v == 0.0 for v in modality["text-only"].values())
    assert all(v == 1.0 for t, kinds in modality.items() if t != "text-only" for v in kinds.values())
    for name in ("wings_no_textual", "wings_no_visual"):
        assert "router" not in variants[name]


@pytest.mark.slow
def test_interpolation_starts_at_the_base_llms_weights(study):
    out, _, _, results = study
    start = results["per_seed"][0]["interp"]["0"]["model"]
    base = load_file(out / "seed-0" / "base_llm" / "model.safetensors")
    mixed = load_file(f"{start}/model.safetensors")
    assert base and all(torch.equal(t, mixed[f"language_model.{k}"]) for k, t in base.items())
    assert results["per_seed"][0]["interp"]["0"]["scores"]["text_heldout"] == \
        results["per_seed"][0]["base"]["scores"]["text_heldout"]  # same LLM weights, same text answers


@pytest.mark.slow
def test_table_results_and_plot_agree(study):
    out, _, printed, results = study
    table = (out / "table.md").read_text()
    assert table.strip() == results["table"].strip() and results["table"] in printed
    summary = results["summary"]
    # The table is the models' table, then (after a blank line) the interpolation curve's.
    main, _, curve_part = table.strip().partition("\n\n")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in main.splitlines()[2:]}
    assert set(rows) == {n for n in summary if not n.startswith("interp@")}
    curve_rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                  for line in curve_part.splitlines() if re.match(r"\| [\d.]+ \|", line)}
    assert curve_rows and {f"interp@{a}" for a in curve_rows} == {n for n in summary if n.startswith("interp@")}
    for a, cells in curve_rows.items():
        assert cells == [fmt(summary[f"interp@{a}"].get(k)) for k in ("text_heldout", "text_seen", "vqa_test")], a
    for name, cells in rows.items():
        assert cells == [fmt(summary[name].get(k)) for k in TABLE_CELLS], name
        assert len(cells) == len(TABLE_CELLS) and all(CELLS[k] for k in TABLE_CELLS)
    points = results["plot"]["points"]
    for name in (n for n in summary if n in VARIANTS):
        assert points[name] == {"x": summary[name]["vqa_test"]["mean"], "y": summary[name]["text_heldout"]["mean"]}
    assert points["base"]["y"] == summary["base"]["text_heldout"]["mean"]
    curve = sorted((n for n in summary if n.startswith("interp@")), key=lambda n: float(n.split("@")[1]))
    assert points["interpolation"]["x"] == [summary[n]["vqa_test"]["mean"] for n in curve]
    report = (out / "REPORT.md").read_text()
    assert results["table"] in report and "The paper's claims, one by one" in report


def test_study_rejects_bad_options(tmp_path, capsys):
    for flags, message in ((["--seeds", "0"], "--seeds must be at least 1"),
                           (["--workers", "0"], "--workers must be at least 1"),
                           (["--variants", "wings,nope"], "unknown variant(s) ['nope']")):
        assert wings_main(["study", "--quick", "--out", str(tmp_path / "s"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_report_only_rebuilds_the_same_outputs(study, capsys):
    out, _, _, results = study
    (out / "table.md").unlink()
    assert wings_main(["study", "--report-only", "--out", str(out)]) == 0
    rebuilt = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text().strip() == results["table"].strip()
    assert rebuilt["summary"] == results["summary"] and rebuilt["claims"] == results["claims"]
