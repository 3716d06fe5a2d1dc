"""Saving and loading Wings on stock VLMs: the adapter (Wings weights + JSON) and the full directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

import wings.vlm as vlm
from vlm_support import mixed_batch, randomize_wings_, tiny


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "smolvlm", "internvl"])
def test_adapter_round_trip_onto_a_fresh_stock_model(kind, tmp_path):
    model, processor = tiny(kind)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    batch, _ = mixed_batch(processor)
    randomize_wings_(vlm.attach(model, rank=4, layers=[1]))
    adapter = vlm.save_adapter(model, tmp_path / "adapter", base_model=str(base_dir))
    meta = json.loads((adapter / "wings_adapter.json").read_text())
    assert meta["base_model"] == str(base_dir) and meta["base_model_type"] == kind
    assert meta["wings"]["learner_layers"] == [1] and meta["wings"]["learner_rank"] == 4
    with safe_open(str(adapter / "wings_adapter.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(vlm.wings_state_dict(model)) and all(".layers.1.self_attn." in n for n in names)
    assert meta["parameters"] == sum(p.numel() for p in vlm.wings_state_dict(model).values())

    fresh, _ = tiny(kind)  # the same stock weights (same seed), no Wings parts
    vlm.load_adapter(fresh, adapter)
    loaded = vlm.from_adapter(adapter)  # the base named in the JSON
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(fresh(**batch).logits, expected)
        assert torch.equal(loaded(**batch).logits, expected)


def test_full_directory_keeps_stock_weight_names(tmp_path):
    model, processor = tiny("llava")
    model.save_pretrained(tmp_path / "stock")
    batch, _ = mixed_batch(processor)
    randomize_wings_(vlm.attach(model, rank=4))
    model.save_pretrained(tmp_path / "wings")
    keys = {d: set(safe_open(str(tmp_path / d / "model.safetensors"), "pt").keys()) for d in ("stock", "wings")}
    assert keys["stock"] <= keys["wings"]  # every stock name as the stock checkpoint has it
    assert all(".self_attn." in k for k in keys["wings"] - keys["stock"])
    config = json.loads((tmp_path / "wings" / "config.json").read_text())
    assert config["model_type"] == "wings_llava" and config["wings"]["learner_rank"] == 4
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "wings")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    # the stock weights also load into the stock class (the Wings tensors are extra keys there)
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "stock")
    assert type(stock).__name__ == "LlavaForConditionalGeneration"


def test_adapter_refusals(tmp_path):
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="carries no Wings learners"):
        vlm.save_adapter(model, tmp_path / "a")
    vlm.attach(model, rank=4)
    adapter = vlm.save_adapter(model, tmp_path / "a")
    other, _ = tiny("qwen2_vl")
    with pytest.raises(ValueError, match="trained on a 'llava' model, not a 'qwen2_vl' one"):
        vlm.load_adapter(other, adapter)
    meta = json.loads((adapter / "wings_adapter.json").read_text())
    meta["wings"]["learner_rank"] = 8  # settings that do not match the saved tensors
    (adapter / "wings_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has shape .* but this model's is"):
        vlm.load_adapter(tiny("llava")[0], adapter)
    with pytest.raises(ValueError, match="has no wings_adapter.json"):
        vlm.load_adapter(tiny("llava")[0], tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no Wings adapter"):
        vlm.save_adapter(model, tmp_path / "busy")
