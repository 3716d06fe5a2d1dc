"""Save/load, Auto-class registration, stage transitions, and clear errors for bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from conftest import randomize_wings_
from wings import WingsConfig, WingsForConditionalGeneration
from wings.builder import init_from_pretrained, save
from wings.cli import main as cli_main


def prompt_batch(processor, n_images=1):
    text = processor.apply_chat_template(
        [{"role": "user", "content": "<image>" * n_images + "\nwhat color is the shape?"}],
        add_generation_prompt=True, tokenize=False,
    )
    images = [Image.new("RGB", (40, 30), (200, 30, 30)) for _ in range(n_images)]
    return processor(text=text, images=images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router", ["position", "segment"])
def test_save_load_round_trip_identical_logits(make_tiny, tmp_path, router, dtype):
    model, processor = make_tiny(router=router)
    randomize_wings_(model)
    model = model.to(dtype)
    save(model, processor, tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=dtype).eval()
    loaded_proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is WingsForConditionalGeneration
    batch = prompt_batch(loaded_proc)
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state)
    with torch.no_grad():
        a, b = model.eval()(**batch).logits, loaded(**batch).logits
    if dtype == torch.float32:
        assert torch.equal(a, b)
    else:  # `.to(bf16)` also casts RoPE's inv_freq buffer, from_pretrained keeps it fp32: tiny bf16 drift
        assert (a - b).abs().max() < 2e-2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "wings" and "auto_map" not in config  # no remote code


def test_stage1_to_stage2_adds_fresh_textual_learners_and_router(make_tiny, tmp_path):
    stage1, processor = make_tiny(use_textual_learner=False, use_router=False)
    randomize_wings_(stage1)
    names = [n for n, _ in stage1.named_parameters()]
    assert not any(".textual." in n or ".router." in n for n in names)
    save(stage1, processor, tmp_path)
    stage2 = WingsForConditionalGeneration.from_pretrained(tmp_path, use_textual_learner=True, use_router=True)
    params = dict(stage2.named_parameters())
    ups = [p for n, p in params.items() if ".textual." in n and n.endswith("up.weight")]
    downs = [p for n, p in params.items() if ".textual." in n and n.endswith("down.weight")]
    assert ups and all(torch.count_nonzero(p) == 0 for p in ups)  # zero-init: the new learner starts as a no-op
    assert all(p.std() > 0 for p in downs)
    assert any(".router." in n for n in params)
    old = dict(stage1.named_parameters())
    for n, p in params.items():
        if ".visual." in n or n.startswith("projector."):
            assert torch.equal(p, old[n]), n


def test_base_weights_keep_stock_names_across_modes(make_tiny, tmp_path):
    """A wings checkpoint loads as the llava baseline (learners dropped) and a llava one as fresh wings."""
    wings_model, processor = make_tiny()
    randomize_wings_(wings_model)
    llava_model, _ = make_tiny(mode="llava")
    assert set(llava_model.state_dict()) <= set(wings_model.state_dict())
    save(wings_model, processor, tmp_path / "w")
    save(llava_model, processor, tmp_path / "l")
    as_llava = WingsForConditionalGeneration.from_pretrained(tmp_path / "w", mode="llava").eval()
    as_wings = WingsForConditionalGeneration.from_pretrained(tmp_path / "l", mode="wings").eval()
    batch = prompt_batch(processor)
    with torch.no_grad():
        reference = llava_model.eval()(**batch).logits
        assert torch.equal(as_llava(**batch).logits, reference)
        assert torch.equal(as_wings(**batch).logits, reference)  # fresh learners: no change


def test_image_count_mismatch_names_both_counts(make_tiny):
    model, processor = make_tiny()
    batch = prompt_batch(processor, n_images=2)
    with pytest.raises(ValueError, match=r"32 image tokens .*2 `<image>`.* but 1 images"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ValueError, match=r"0 image tokens .* but 1 images"):
        model(input_ids=torch.tensor([[5, 6, 7]]), pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ValueError, match=r"2 `<image>` placeholders but 1 images"):
        processor(text="<image><image> hi", images=[Image.new("RGB", (8, 8))])


def test_bad_image_tensors_are_rejected(make_tiny):
    model, processor = make_tiny()
    ids = prompt_batch(processor)["input_ids"]
    with pytest.raises(ValueError, match="num_images, 3, H, W"):
        model(input_ids=ids, pixel_values=torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expects \(32, 32\)"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="not-an-image: does not exist"):
        processor(text="<image>", images=["not-an-image"])


def test_processor_reads_image_sources_as_transformers_passes_them(make_tiny, tmp_path):
    """transformers 5 hands processors images as strings (paths, data URLs): the same pixels as a PIL image."""
    import base64

    from PIL import Image

    _, processor = make_tiny()
    path = tmp_path / "shape.png"
    Image.effect_noise((40, 30), 60).convert("RGB").save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    reference = processor(text="<image>", images=[Image.open(path)])["pixel_values"]
    for source in (str(path), path, url, path.read_bytes()):
        assert torch.equal(processor(text="<image>", images=[source])["pixel_values"], reference)


def test_unsupported_backbones_are_named(make_tiny):
    model, _ = make_tiny()
    config = model.config.to_dict()
    config["vision_config"] = {"model_type": "vit", "image_size": 32, "patch_size": 8}
    with pytest.raises(ValueError, match="'vit' is not supported"):
        WingsForConditionalGeneration(WingsConfig(**config))
    config = model.config.to_dict()
    config["text_config"] = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 600}
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no `model.layers`"):
        WingsForConditionalGeneration(WingsConfig(**config))


def test_missing_or_unreadable_model_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_from_pretrained(tmp_path / "nope", tmp_path / "nope2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        init_from_pretrained(tmp_path / "empty", tmp_path / "empty")
    assert cli_main(["init-model", "--llm", str(tmp_path / "nope"), "--vision", "x", "--out", str(tmp_path / "o")]) == 2


def test_init_model_from_hf_dirs_round_trips(make_tiny, tmp_path, capsys):
    """Compose from a saved HF causal LM + a saved vision encoder, through the CLI, then load with Auto classes."""
    model, processor = make_tiny(mode="llava")
    llm_dir, vision_dir = tmp_path / "llm", tmp_path / "vision"
    model.language_model.save_pretrained(llm_dir)
    processor.tokenizer.save_pretrained(llm_dir)
    model.vision_tower.save_pretrained(vision_dir)
    processor.image_processor.save_pretrained(vision_dir)
    out = tmp_path / "composed"
    rc = cli_main(["init-model", "--llm", str(llm_dir), "--vision", str(vision_dir), "--out", str(out),
                   "--rank", "4", "--router", "segment"])
    assert rc == 0 and "wrote wings model" in capsys.readouterr().out
    composed = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert AutoConfig.from_pretrained(out).router_type == "segment"
    base = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        assert torch.equal(composed(input_ids=ids).logits, base(input_ids=ids).logits)


def test_tiny_preset_cli(tmp_path):
    assert cli_main(["init-model", "--preset", "tiny", "--tiny-llm", "llama", "--tiny-vision", "clip",
                     "--stage", "1", "--out", str(tmp_path)]) == 0
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.text_config.model_type == "llama" and config.vision_config.model_type == "clip_vision_model"
    assert not config.use_textual_learner and not config.use_router
    assert config.image_seq_length == 16  # CLS dropped by the default feature selection
