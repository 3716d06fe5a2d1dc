"""IIT builder: deterministic for a seed, the six configurations have the right turn shapes, the output is a
valid task file; `wings eval` on it reports accuracy per configuration and draws it."""

from __future__ import annotations

import json

import pytest

from test_eval_common import text_records, vqa_records, write_jsonl
from wings.cli import main
from wings.evaluation.iit import PAPER_CONFIGS, build_iit, build_iit_file, parse_configs
from wings.evaluation.tasks import load_task


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("iit_pools")
    text = write_jsonl(root / "text.jsonl", text_records(8))
    mm = write_jsonl(root / "mm.jsonl", vqa_records(6, mc=True)[:3] + vqa_records(3, offset=10))
    return text, mm


def test_deterministic_for_a_seed(pools, tmp_path):
    text, mm = pools
    a = build_iit_file(text, mm, "T,TT,TTT,TTV,TV,V", 4, 7, tmp_path / "a" / "iit.jsonl")
    b = build_iit_file(text, mm, "T,TT,TTT,TTV,TV,V", 4, 7, tmp_path / "b" / "iit.jsonl")
    c = build_iit_file(text, mm, "T,TT,TTT,TTV,TV,V", 4, 8, tmp_path / "c" / "iit.jsonl")
    assert (tmp_path / "a" / "iit.jsonl").read_bytes() == (tmp_path / "b" / "iit.jsonl").read_bytes()
    assert a == b and a != c
    # a configuration's dialogues do not depend on which other configurations are built
    only = build_iit_file(text, mm, "TV", 4, 7, tmp_path / "a" / "tv.jsonl")
    assert only == [r for r in a if r["config"] == "TV"]


def test_configuration_shapes(pools, tmp_path):
    text, mm = pools
    out = tmp_path / "sub" / "iit.jsonl"
    records = build_iit_file(text, mm, ",".join(PAPER_CONFIGS), 5, 0, out)
    assert [r["config"] for r in records] == [c for c in PAPER_CONFIGS for _ in range(5)]
    text_ids = {r["id"] for r in text_records(8)}
    task = load_task(out)  # a valid task file: relative image paths resolve from the output's directory
    for rec, item in zip(records, task.items, strict=True):
        config = rec["config"]
        turns = [*item.context, item]
        assert len(turns) == len(config) and item.config == config
        assert len(set(rec["sources"])) == len(config)  # distinct items within a dialogue
        for kind, turn, source in zip(config, turns, rec["sources"], strict=True):
            assert bool(turn.images) == (kind == "V")
            assert (source in text_ids) == (kind == "T")
        assert all(not p.startswith("/") for p in rec.get("images", []))
    assert {len(i.context) for i in task.items} == {0, 1, 2}


def test_context_turns_carry_gold_answers(pools, tmp_path):
    text, mm = pools
    pool = {r["id"]: r for r in text_records(8) + vqa_records(6, mc=True)[:3] + vqa_records(3, offset=10)}
    for rec in build_iit(load_task(text), load_task(mm), ["TTV"], 6, 3, tmp_path):
        for turn, source in zip(rec["context"], rec["sources"], strict=False):
            src = pool[source]
            gold = src["options"][src["answer"]] if isinstance(src["answer"], int) else src["answer"]
            assert turn == {"question": src["question"], "answer": gold}


def test_bad_builds(pools, tmp_path):
    text, mm = pools
    with pytest.raises(ValueError, match="string of T and V"):
        parse_configs("T,TX")
    with pytest.raises(ValueError, match="needs 9 distinct text items"):
        build_iit(load_task(text), load_task(mm), ["T" * 9], 1, 0, tmp_path)
    with pytest.raises(ValueError, match=r"text pool .* record 'v0' has images"):
        build_iit(load_task(mm), load_task(mm), ["T"], 1, 0, tmp_path)
    with pytest.raises(ValueError, match=r"multimodal pool .* record 't0' has no image"):
        build_iit(load_task(text), load_task(text), ["V"], 1, 0, tmp_path)


def test_cli_build_then_eval_per_configuration(pools, tiny_model_dir, tmp_path, capsys):
    text, mm = pools
    out = tmp_path / "iit.jsonl"
    assert main(["iit", "build", "--text-pool", str(text), "--mm-pool", str(mm), "--configs", "T,TTV,TV,V",
                 "--per-config", "3", "--seed", "1", "--out", str(out)]) == 0
    assert "T=3, TTV=3, TV=3, V=3" in capsys.readouterr().out
    res = tmp_path / "res" / "results.json"
    assert main(["eval", str(tiny_model_dir), "--task", str(out), "--out", str(res), "--batch-size", "4",
                 "--max-new-tokens", "2"]) == 0
    summary = json.loads(res.read_text())
    metrics = summary["tasks"]["iit"]
    assert list(metrics["per_config"]) == ["T", "TTV", "TV", "V"]
    assert all(m["n"] == 3 for m in metrics["per_config"].values())
    preds = [json.loads(line) for line in (tmp_path / "res" / "results.iit.predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12
    for config, m in metrics["per_config"].items():
        assert m["correct"] == sum(p["correct"] for p in preds if p["config"] == config)
    assert metrics["correct"] == sum(m["correct"] for m in metrics["per_config"].values())
    png = tmp_path / "res" / "results.iit.iit.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
