"""`wings eval`, `wings forgetting` (the stock VLM as the base) and `wings laws` on stock VLMs with Wings attached."""

from __future__ import annotations

import json

import pytest
import torch

import wings.vlm as vlm
from test_eval_common import text_records, vqa_records, write_jsonl
from vlm_support import init_wings_dir, randomize_wings_
from wings.cli import main as wings_main
from wings.evaluation import evaluate_task, load_eval_model, load_task
from wings.evaluation.laws import compute_laws
from wings.vlm.tiny import save_tiny_vlm


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_eval")
    out = {"stock": save_tiny_vlm("qwen2_vl", root / "stock"), "fresh": init_wings_dir("qwen2_vl", root / "fresh",
                                                                                       stage=2)}
    model = vlm.attach(vlm.tiny.build_tiny_vlm("qwen2_vl")[0], rank=4)
    randomize_wings_(model)
    model.save_pretrained(root / "trained")
    vlm.save_processor(vlm.tiny.build_tiny_vlm("qwen2_vl")[1], root / "trained")
    out["trained"] = root / "trained"
    out["text"] = write_jsonl(root / "text.jsonl", text_records(8))
    out["vqa"] = write_jsonl(root / "vqa.jsonl", vqa_records(6, mc=True))
    return out


def test_eval_scores_images_batched_as_alone(dirs):
    em = load_eval_model(dirs["trained"])
    task = load_task(dirs["vqa"])
    batched = evaluate_task(em, task, batch_size=3, progress=False)
    alone = evaluate_task(em, task, batch_size=1, progress=False)
    for a, b in zip(batched.predictions, alone.predictions, strict=True):
        assert a["prediction"] == b["prediction"]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


def test_forgetting_with_the_stock_vlm_as_base(dirs, tmp_path, capsys):
    out = tmp_path / "forgetting"
    assert wings_main(["forgetting", "--base", str(dirs["stock"]), "--model", str(dirs["fresh"]), "--model",
                       str(dirs["trained"]), "--task", str(dirs["text"]), "--out", str(out), "--batch-size", "4"]) == 0
    report = json.loads((out / "forgetting.json").read_text())
    row = report["tasks"]["text"]["models"]
    assert row["fresh"]["delta"] == 0.0  # fresh learners: exactly the base's text-only scores
    fresh = [json.loads(line) for line in (out / "fresh" / "results.text.predictions.jsonl").read_text().splitlines()]
    base = [json.loads(line) for line in (out / "stock" / "results.text.predictions.jsonl").read_text().splitlines()]
    assert [r.get("logprobs") for r in fresh] == [r.get("logprobs") for r in base]
    assert [r["prediction"] for r in fresh] == [r["prediction"] for r in base]


def test_laws_on_an_attached_model(dirs, tmp_path):
    em = load_eval_model(dirs["trained"])
    result = compute_laws(em, load_task(dirs["vqa"]), progress=False)
    assert result["n_items"] == 6 and result["n_layers"] == 2
    for layer in range(2):  # the three segments' masses per query sum to 1
        total = sum(result["laws_mean"][name][layer] for name in ("text_before", "image", "text_after"))
        assert total == pytest.approx(1.0, abs=1e-5)
    assert all(m > 0 for m in result["laws_mean"]["image"])
    with torch.no_grad():  # the model is back on its own attention kernel
        assert em.model.config.get_text_config()._attn_implementation != "eager"
