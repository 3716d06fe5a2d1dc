"""Forgetting report: base LLM vs MLLMs on text-only tasks. MLLMs with fresh learners score exactly like their
base LLM (same prompts, same log-likelihoods); a Wings model whose learners changed does not; the table's delta
and retention are computed from the per-model results."""

from __future__ import annotations

import json

import pytest

from conftest import randomize_wings_
from test_eval_common import save_base_llm, text_records, vqa_records, write_jsonl
from wings.builder import save
from wings.cli import main
from wings.evaluation.forgetting import forgetting_table, run_forgetting


@pytest.fixture(scope="module")
def setup_dirs(tiny_llava_dir, tiny_model_dir, make_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("forgetting")
    base = save_base_llm(tiny_llava_dir, root / "base-llm")
    model, processor = make_tiny()  # same seed as the fixtures: same LLM weights
    changed = save(randomize_wings_(model, std=0.5, seed=4), processor, root / "wings-changed")
    records = text_records(12)
    tasks = [write_jsonl(root / "arith.jsonl", records[:8]), write_jsonl(root / "numbers.jsonl", records[8:])]
    return base, tiny_model_dir, tiny_llava_dir, changed, tasks


def load_preds(path):
    return {p["id"]: p for p in map(json.loads, open(path).read().splitlines())}


def test_report_against_per_model_results(setup_dirs, tmp_path):
    base, fresh, llava, changed, tasks = setup_dirs
    report = run_forgetting(base, [fresh, llava, changed], tasks, tmp_path, labels=["wings", "llava", "changed"],
                            batch_size=4, max_new_tokens=2, progress=False)
    assert report["base"] == "base-llm" and report["models"] == ["wings", "llava", "changed"]
    for task in ("arith", "numbers"):
        base_preds = load_preds(tmp_path / "base-llm" / f"results.{task}.predictions.jsonl")
        for label in ("wings", "llava"):  # fresh learners / no learners: exactly the base LLM on text
            preds = load_preds(tmp_path / label / f"results.{task}.predictions.jsonl")
            for k, p in preds.items():
                assert p["prediction"] == base_preds[k]["prediction"]
                assert p.get("logprobs") == pytest.approx(base_preds[k].get("logprobs"), abs=1e-4)
            assert report["tasks"][task]["models"][label]["delta"] == 0.0
        changed_preds = load_preds(tmp_path / "changed" / f"results.{task}.predictions.jsonl")
        assert any(p.get("logprobs") and p["logprobs"] != pytest.approx(base_preds[k]["logprobs"], abs=1e-3)
                   for k, p in changed_preds.items())
        for label in report["models"]:
            results = json.loads((tmp_path / label / "results.json").read_text())["tasks"][task]
            base_acc = json.loads((tmp_path / "base-llm" / "results.json").read_text())["tasks"][task]["accuracy"]
            row = report["tasks"][task]["models"][label]
            assert row["accuracy"] == results["accuracy"]
            assert row["delta"] == pytest.approx(results["accuracy"] - base_acc)
            assert row["retention"] == (pytest.approx(results["accuracy"] / base_acc) if base_acc else None)
    saved = json.loads((tmp_path / "forgetting.json").read_text())
    assert saved["tasks"] == json.loads(json.dumps(report["tasks"]))
    assert (tmp_path / "forgetting.png").read_bytes()[:4] == b"\x89PNG"


def test_table_arithmetic():
    def m(acc):
        return {"accuracy": acc, "ci95": [0.0, 1.0], "n": 10}

    scores = {"base": {"a": m(0.5), "b": m(0.0)}, "mllm": {"a": m(0.4), "b": m(0.2)}}
    table = forgetting_table("base", scores)
    a, b = table["tasks"]["a"]["models"]["mllm"], table["tasks"]["b"]["models"]["mllm"]
    assert a["delta"] == pytest.approx(-0.1) and a["retention"] == pytest.approx(0.8)
    assert b["delta"] == pytest.approx(0.2) and b["retention"] is None  # base scored 0: no ratio
    mean = table["macro_mean"]["mllm"]
    assert mean["accuracy"] == pytest.approx(0.3) and mean["delta"] == pytest.approx(0.05)
    assert mean["retention"] is None
    assert table["macro_mean"]["base"]["accuracy"] == pytest.approx(0.25)


def test_cli(setup_dirs, tmp_path, capsys):
    base, fresh, llava, _, tasks = setup_dirs
    out = tmp_path / "report"
    assert main(["forgetting", "--base", str(base), "--model", str(fresh), "--model", str(llava),
                 "--task", str(tasks[0]), "--out", str(out), "--max-new-tokens", "2"]) == 0
    console = capsys.readouterr().out
    assert "base-llm (base)" in console and fresh.name in console and "macro mean" in console
    report = json.loads((out / "forgetting.json").read_text())
    assert report["models"] == [fresh.name, llava.name]

    image_task = write_jsonl(tmp_path / "vqa.jsonl", vqa_records(1))
    assert main(["forgetting", "--base", str(base), "--model", str(fresh), "--task", str(image_task),
                 "--out", str(out)]) == 2
    assert "record 'v0' has images" in capsys.readouterr().err
    assert main(["forgetting", "--base", str(base), "--model", str(fresh), "--model", str(llava), "--label", "x",
                 "--label", "x", "--task", str(tasks[0]), "--out", str(out)]) == 2
    assert "distinct --label" in capsys.readouterr().err
