"""Wings attached to stock transformers VLMs: the model's invariants hold for every supported family.

Tiny random stock models (wings.vlm.tiny) with their own processors and real easy-vqa images; each family builds in
under a second. Measured on this CPU: fresh learners change logits by <= 1.5e-7, batch-vs-alone differs by
<= 1.2e-7, with random learners and router.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

import wings.vlm as vlm
import wings.vlm.hooks as hooks
from vlm_support import ALL, QWEN, mixed_batch, randomize_wings_, render, tiny

TOL = 1e-5


def _valid(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool()


@pytest.mark.parametrize("kind", ALL)
def test_fresh_learners_keep_the_stock_logits(kind):
    model, processor = tiny(kind)
    batch, _ = mixed_batch(processor)
    text_only = dict(processor(text=[render(processor, [{"type": "text", "text": "what is 2 + 2?"}])],
                               return_tensors="pt"))
    with torch.no_grad():
        stock, stock_text = model(**batch).logits, model(**text_only).logits
        vlm.attach(model, rank=4, stage=1)
        stage1, stage1_text = model(**batch).logits, model(**text_only).logits
        vlm.add_stage2_parts(model)
        stage2, stage2_text = model(**batch).logits, model(**text_only).logits
    valid = _valid(batch)
    assert (stage1 - stock)[valid].abs().max() <= TOL
    assert (stage2 - stock)[valid].abs().max() <= TOL
    # text only: the visual learner has no keys (skipped), the router is not consulted (no sample has an image) and
    # fresh learners add exactly zero: the stock numbers, bit for bit
    assert torch.equal(stage1_text, stock_text)
    assert torch.equal(stage2_text, stock_text)


@pytest.mark.parametrize("kind", ALL)
def test_random_learners_decode_consistently(kind):
    model, processor = tiny(kind)
    batch, alone = mixed_batch(processor)
    vlm.attach(model, rank=4)
    randomize_wings_(model)
    with torch.no_grad():
        logits = model(**batch).logits
        stock_like = _stock_logits(kind, batch)
        assert (logits - stock_like)[_valid(batch)].abs().max() > 1e-2  # the Wings path is really on
        for i, sample in enumerate(alone):  # left-padded batch == each row alone
            row = model(**sample).logits[0]
            assert (logits[i][_valid(batch)[i]] - row).abs().max() <= TOL
        cached = model.generate(**batch, max_new_tokens=5, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
        beams = model.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2)
    assert torch.equal(cached, uncached)
    assert beams.shape[0] == batch["input_ids"].shape[0]


def _stock_logits(kind: str, batch: dict) -> torch.Tensor:
    model, _ = tiny(kind)
    return model(**batch).logits


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "smolvlm"])
def test_detach_gives_the_stock_model_back(kind):
    model, processor = tiny(kind)
    batch, _ = mixed_batch(processor)
    stock_type, stock_config_type = type(model), type(model.config)
    with torch.no_grad():
        before = model(**batch).logits
        randomize_wings_(vlm.attach(model, rank=4))
        assert not torch.allclose(model(**batch).logits, before)
        vlm.detach(model)
        after = model(**batch).logits
    assert type(model) is stock_type and type(model.config) is stock_config_type
    assert not hasattr(model.config, "wings") and model.config.model_type == kind
    assert not any(".self_attn.visual." in n for n, _ in model.named_parameters())
    assert torch.equal(after, before)


@pytest.mark.parametrize("kind", QWEN)
def test_qwen_learner_keys_rotate_with_their_3d_rope_ids(kind, monkeypatch):
    """M-RoPE: an image's tokens share a temporal id and vary in height/width; the visual learner's keys must be
    rotated with exactly those ids (as the main attention rotates the same tokens), not the 1D order."""
    model, processor = tiny(kind)
    batch, _ = mixed_batch(processor)
    vlm.attach(model, rank=4)
    states = []
    real_build = hooks.build_state
    monkeypatch.setattr(hooks, "build_state", lambda *a, **k: states.append(real_build(*a, **k)) or states[-1])
    with torch.no_grad():
        model(**batch)
    visual = states[0].visual_tokens
    image_grid = batch["image_grid_thw"]
    rope_ids, _ = model.model.get_rope_index(batch["input_ids"], image_grid_thw=image_grid,
                                             attention_mask=batch["attention_mask"],
                                             mm_token_type_ids=batch["mm_token_type_ids"])  # [3, B, T]
    rotary = model.model.language_model.rotary_emb
    for row in range(2):  # the two image samples
        columns = (batch["input_ids"][row] == model.config.image_token_id).nonzero().squeeze(1)
        n = columns.numel()
        ids = rope_ids[:, row:row + 1, columns]  # [3, 1, n]
        assert len(set(ids[0, 0].tolist())) == 1 and len(set(ids[1, 0].tolist())) > 1  # one t, several h
        cos, sin = rotary(visual.feats[row:row + 1, :n], ids)
        assert torch.allclose(visual.cos[row, 0, :n], cos[0], atol=1e-6)
        assert torch.allclose(visual.sin[row, 0, :n], sin[0], atol=1e-6)
        order_cos, _ = rotary(visual.feats[row:row + 1, :n], visual.positions[row:row + 1, :n])
        assert not torch.allclose(visual.cos[row, 0, :n], order_cos[0], atol=1e-3)  # not the 1D order


def test_unsupported_and_double_attach_are_refused():
    from transformers import MllamaConfig

    model, _ = tiny("llava")
    vlm.attach(model, rank=4)
    with pytest.raises(ValueError, match="already carries Wings learners"):
        vlm.attach(model, rank=4)
    with pytest.raises(vlm.UnsupportedVLM, match="cross-attention.*Supported: idefics3, internvl, llava"):
        vlm.arch_for(MllamaConfig().model_type)
    with pytest.raises(vlm.UnsupportedVLM, match="no attach entry for model_type 'blip-2'"):
        vlm.arch_for("blip-2")
    with pytest.raises(ValueError, match="takes a LlavaForConditionalGeneration"):
        vlm.attach(tiny("llava")[0].model, rank=4)
    with pytest.raises(ValueError, match="learner_layers has 7"):
        vlm.attach(tiny("llava")[0], rank=4, layers=[7])


def test_attached_model_saves_and_loads_as_a_full_directory(tmp_path):
    model, processor = tiny("qwen2_vl")
    batch, _ = mixed_batch(processor)
    randomize_wings_(vlm.attach(model, rank=4))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "WingsQwen2VLForConditionalGeneration" and vlm.is_attached(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_a_deep_copy_is_a_model_of_its_own():
    import copy

    model, processor = tiny("qwen2_vl")
    batch, _ = mixed_batch(processor)
    randomize_wings_(vlm.attach(model, rank=4))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(twin(**batch).logits, expected)
        vlm.detach(twin)  # detaching the copy leaves the original attached
        assert vlm.is_attached(model) and not vlm.is_attached(twin)
        assert torch.equal(model(**batch).logits, expected)
        assert torch.equal(twin(**batch).logits, tiny("qwen2_vl")[0](**batch).logits)
