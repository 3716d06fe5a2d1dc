"""`wings init-model --vlm` and the one-line refusals around it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

import wings.vlm as vlm
from vlm_support import mixed_batch
from wings.cli import main as wings_main
from wings.vlm.tiny import build_tiny_vlm, save_tiny_vlm


@pytest.fixture(scope="module")
def stock_llava(tmp_path_factory):
    return save_tiny_vlm("llava", tmp_path_factory.mktemp("stock") / "llava")


def test_init_model_vlm_writes_a_loadable_stage1_model(stock_llava, tmp_path, capsys):
    out = tmp_path / "init"
    assert wings_main(["init-model", "--vlm", str(stock_llava), "--out", str(out), "--rank", "4", "--stage", "1",
                       "--layers", "1"]) == 0
    assert "WingsLlavaForConditionalGeneration" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "wings_llava"
    assert config["wings"] | {} == config["wings"] and config["wings"]["learner_layers"] == [1]
    assert not config["wings"]["use_textual_learner"] and config["wings"]["router_type"] == "segment"
    model = AutoModelForImageTextToText.from_pretrained(out)
    stock, processor = build_tiny_vlm("llava")
    batch, _ = mixed_batch(vlm.load_processor(out))
    with torch.no_grad():
        assert (model(**batch).logits - stock(**batch).logits).abs().max() <= 1e-5  # fresh learners


def test_init_model_vlm_refusals(stock_llava, tmp_path, capsys):
    def refused(*argv: str) -> str:
        assert wings_main(["init-model", *argv]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]  # (after any progress bar)

    out = str(tmp_path / "x")
    assert "attaches Wings to a stock one" in refused("--vlm", str(stock_llava), "--llm", "a", "--out", out)
    assert "already the LLaVA-style baseline" in refused("--vlm", str(stock_llava), "--mode", "llava", "--out", out)
    assert "Supported: idefics3, internvl" in refused("--preset", "tiny", "--tiny-vlm", "mllama", "--out", out)
    assert "has layers 0..1" in refused("--vlm", str(stock_llava), "--layers", "5", "--out", out)
    wings_main(["init-model", "--vlm", str(stock_llava), "--out", out, "--rank", "4"])
    capsys.readouterr()
    assert "Wings attached already" in refused("--vlm", out, "--out", str(tmp_path / "y"))
    # a processor from another model: its image token is not the model's image token
    mixed = tmp_path / "mixed"
    save_tiny_vlm("llava", mixed)
    vlm.save_processor(build_tiny_vlm("qwen2_vl")[1], mixed)
    message = refused("--vlm", str(mixed), "--out", str(tmp_path / "z"))
    assert "image token '<|image_pad|>'" in message and "belongs to another model" in message
