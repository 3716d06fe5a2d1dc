"""`wings demo --quick` end to end (150-170 s on 2 idle cores): it completes and the models learned."""

from __future__ import annotations

import json

import pytest

from wings.cli import main as wings_main


@pytest.mark.slow
def test_quick_demo_completes_and_models_learn(tmp_path, capsys):
    out = tmp_path / "demo"
    assert wings_main(["demo", "--quick", "--out", str(out)]) == 0
    console = capsys.readouterr()
    printed = console.out
    assert "| model | text-only held-out" in printed and "total time" in printed
    # A quiet console: bars, one note where stage 2 adds fresh learners, the table, where the report went. No
    # load tables for the learners stages add or drop on purpose, no Trainer log dictionaries, no tracebacks.
    assert "wings_stage2: adds fresh textual learners and router" in printed
    assert f"report: {out}/REPORT.md" in printed
    for noise in ("LOAD REPORT", "MISSING", "UNEXPECTED", "'grad_norm'", "Traceback", "checking "):
        assert noise not in printed and noise not in console.err, noise
    assert "wings_stage2" in console.err and "loss=" in console.err  # the stage's progress bar, with its loss
    assert len(printed.splitlines()) < 40
    logs = out / "logs"
    assert "'grad_norm'" in (logs / "wings_stage2.log").read_text()  # the full Trainer log went to the file

    results = json.loads((out / "results.json").read_text())
    # Stage 2 follows the paper's data mix: text-only records are ~6% of it (LLaVA-665K: 40K of 665K).
    added = results["stages"]["wings_stage2"]["data"]["text_mix"]["added"]
    assert 0.055 < added / (added + results["plan"]["vqa_train_records"]) < 0.065
    for name in ("REPORT.md", "forgetting.png", "iit.png", "laws_llava.png", "laws_wings.png", "losses.png"):
        assert (out / name).stat().st_size > 0, name
    for stage in ("llava_stage1", "llava_stage2", "wings_stage1", "wings_stage2"):
        assert (out / stage / "train_config.yaml").is_file()
        losses = [loss for _, loss in results["stages"][stage]["losses"]]
        assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, stage  # training lowered the loss

    scores = results["scores"]
    # Only outcomes that held with a wide margin on every measured run are asserted. Quick mode measured on seeds
    # 0-4 x 1 and 2 torch threads (10 runs; docs/demo/QUICK_SEEDS.md has every row), chance on easy-vqa 0.42-0.44:
    #   base LLM held-out text, 95% interval's lower end: 0.59-0.77 (bound 0.45)
    #   easy-vqa accuracy minus chance: LLaVA 0.17-0.42, Wings 0.25-0.41 (bound 0.05)
    #   colour questions (chance 1/8): LLaVA 0.56-0.97, Wings 0.65-0.97 (bound 0.3)
    # Not asserted: which model is ahead (Wings kept more held-out text on 9 of 10 runs, by 0.02-0.10, and tied
    # on one; easy-vqa goes either way) and yes/no (LLaVA sat near chance on seed 3 with both thread counts).
    # Base LLM: multiple choice over 4 options (chance 0.25) on held-out phrasings of the facts it was taught.
    assert scores["base"]["text_heldout"]["ci95"][0] > 0.25 + 0.2
    tasks = [json.loads(line) for line in (out / "data" / "vqa_test.jsonl").read_text().splitlines()]
    chance = sum(1 / len(t["options"]) for t in tasks) / len(tasks)
    for family in ("llava", "wings"):  # both MLLMs learned easy-vqa, and colour questions well above 1/8
        vqa = scores[family]["vqa_test"]
        assert vqa["accuracy"] > chance + 0.05, (family, vqa["accuracy"], chance)
        assert vqa["per_category"]["colour"] > 0.3, (family, vqa["per_category"])
    for family in ("llava", "wings"):
        assert set(results["iit"][family]["per_config"]) == {"T", "TT", "TTT", "TTV", "TV", "V"}
        assert 0.0 <= results["laws"][family]["attention_shift"] <= 2.0

