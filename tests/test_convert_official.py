"""`wings convert-official` on a tiny checkpoint in the AIDC-AI/Wings layout, checked against an independent,
literal re-statement of the released inference math (official-code-audit.md, section 4)."""

from __future__ import annotations

import copy
import json

import easy_vqa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from wings.cli import main
from wings.convert import convert_official

H, LAYERS, RANK, SPL, LEARNER_LAYERS = 64, 3, 8, 5, [0, 2]
VISION = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_attention_heads=4)


def qwen(tokenizer, seed):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer) + 24, hidden_size=H, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)


def release_tensors(tokenizer) -> dict[str, torch.Tensor]:
    """A random 'released' state dict: fine-tuned LLM, learners on LEARNER_LAYERS, router, projector, and a
    vision tower with its last encoder layer and head deleted."""
    gen = torch.Generator().manual_seed(5)
    tensors = {k: v.clone() for k, v in qwen(tokenizer, seed=11).state_dict().items()}
    for i in LEARNER_LAYERS:
        for pool in ("attn_pool", "attn_t_pool"):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[f"model.layers.{i}.{pool}.{proj}.0.weight"] = torch.randn(RANK, H, generator=gen) * 0.2
                tensors[f"model.layers.{i}.{pool}.{proj}.1.weight"] = torch.randn(H, RANK, generator=gen) * 0.2
        tensors[f"model.layers.{i}.reweight_module.linear.weight"] = torch.randn(2, 4096, generator=gen)
        tensors[f"model.layers.{i}.reweight_module.linear.bias"] = torch.randn(2, generator=gen)
    tensors["model.mm_projector.0.weight"] = torch.randn(H, 48, generator=gen) * 0.1
    tensors["model.mm_projector.0.bias"] = torch.randn(H, generator=gen) * 0.1
    tensors["model.mm_projector.2.weight"] = torch.randn(H, H, generator=gen) * 0.1
    tensors["model.mm_projector.2.bias"] = torch.randn(H, generator=gen) * 0.1
    torch.manual_seed(13)
    vision = SiglipVisionModel(SiglipVisionConfig(num_hidden_layers=2, **VISION))  # = 3 layers minus the last
    for key, value in vision.state_dict().items():
        if not key.startswith("head."):
            tensors[f"model.vision_tower.vision_tower.vision_model.{key}"] = value.clone()
    return tensors


def write_release(tensors: dict[str, torch.Tensor], path, shards: int = 2) -> None:
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        save_file(part, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "wings_qwen2", "lora_dim": RANK,
                                                  "system_prompt_length": SPL, "image_token_length": 16}))


def build_release(tiny_tokenizer, root) -> dict[str, torch.Tensor]:
    """A tiny release under root: the LLM (llm/), the vision encoder (vision/) and the released weights (src/);
    returns the released tensors."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    qwen(tokenizer, seed=3).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    torch.manual_seed(4)
    SiglipVisionModel(SiglipVisionConfig(num_hidden_layers=3, **VISION)).save_pretrained(root / "vision")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "vision")
    tensors = release_tensors(tokenizer)
    write_release(tensors, root / "src")
    return tensors


@pytest.fixture(scope="module")
def release(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    return root, build_release(tiny_tokenizer, root)


@pytest.fixture(scope="module")
def converted(release):
    root, _ = release
    out = root / "converted"
    assert main(["convert-official", str(root / "src"), str(out), "--llm", str(root / "llm"),
                 "--vision", str(root / "vision")]) == 0
    return AutoModelForImageTextToText.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)


# ---------------------------------------------------------------------------------------------------------------
# The released inference, written out literally (bs = 1, eager attention, learner outputs added twice).


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def released_learner(t, i, pool, x, feats, q_pos, k_pos, rotary, allowed):
    def proj(name, v):
        return v @ t[f"model.layers.{i}.{pool}.{name}.0.weight"].T @ t[f"model.layers.{i}.{pool}.{name}.1.weight"].T

    heads = lambda v: v.view(1, v.shape[1], 4, H // 4).transpose(1, 2)  # noqa: E731
    q_cos, q_sin = rotary(x, q_pos[None])
    k_cos, k_sin = rotary(x, k_pos[None])
    q = rope(heads(x + proj("q_proj", x)), q_cos, q_sin)
    k = rope(heads(feats + proj("k_proj", feats)), k_cos, k_sin)
    v = heads(feats + proj("v_proj", feats))
    scores = (q @ k.transpose(-1, -2)).float() / (H // 4) ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, x.shape[1], H)
    return proj("o_proj", out)


def released_logits(t, llm, vision, input_ids, pixel_values, image_token_id):
    embeds = llm.model.embed_tokens(input_ids)
    is_image = input_ids[0] == image_token_id
    if pixel_values is not None:
        feats = vision(pixel_values, output_hidden_states=True).hidden_states[-1]  # before post_layernorm
        feats = F.gelu(feats @ t["model.mm_projector.0.weight"].T + t["model.mm_projector.0.bias"])
        feats = feats @ t["model.mm_projector.2.weight"].T + t["model.mm_projector.2.bias"]
        embeds = embeds.clone()
        embeds[0, is_image] = feats[0]
    S = input_ids.shape[1]
    pos = torch.arange(S)
    cos, sin = llm.model.rotary_emb(embeds, pos[None])
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = torch.zeros(S, S).masked_fill(~causal, float("-inf"))[None, None]
    image_pos = pos[is_image]
    if len(image_pos):
        b, n = int(image_pos[0]), len(image_pos)
        text_pos = torch.cat([torch.arange(SPL, b), torch.arange(b + n, S)])
    else:
        text_pos = pos
    h = embeds
    for i, layer in enumerate(llm.model.layers):
        attn_out, probs = layer.self_attn(layer.input_layernorm(h), position_embeddings=(cos, sin),
                                          attention_mask=mask)
        h = h + attn_out
        if i in LEARNER_LAYERS:
            txt = released_learner(t, i, "attn_t_pool", h, embeds[:, text_pos], pos, text_pos, llm.model.rotary_emb,
                                   causal[:, : len(text_pos)])
            if len(image_pos):
                vis = released_learner(t, i, "attn_pool", h, embeds[:, image_pos], pos, image_pos,
                                       llm.model.rotary_emb, None)
                router = t[f"model.layers.{i}.reweight_module.linear.weight"][:, :S]
                z = probs.sum(1) @ router.T + t[f"model.layers.{i}.reweight_module.linear.bias"]
                w = F.silu(z).softmax(-1)
                h = h + w[..., :1] * vis + w[..., 1:] * txt
                h = h + w[..., :1] * vis + w[..., 1:] * txt  # the released loop adds both outputs again
            else:
                h = h + txt
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return llm.lm_head(llm.model.norm(h))


@pytest.fixture(scope="module")
def reference(release, tiny_tokenizer):
    _, t = release
    llm = qwen(tiny_tokenizer, seed=0)
    llm.config._attn_implementation = "eager"  # the released code forces eager for the router's probabilities
    llm.load_state_dict({k: v for k, v in t.items() if k.startswith(("model.layers", "model.embed", "model.norm",
                                                                        "lm_head")) and "pool" not in k
                         and "reweight" not in k})
    vision = SiglipVisionModel(SiglipVisionConfig(num_hidden_layers=2, **VISION))
    prefix = "model.vision_tower.vision_tower.vision_model."
    vision.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}, strict=False)
    return t, llm.eval(), vision.eval()


def chat(processor, user: str) -> str:
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": user}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("with_image", [True, False])
def test_converted_model_reproduces_released_inference(converted, reference, with_image):
    model, processor = converted
    t, llm, vision = reference
    assert model.config.compat == "official" and model.config.learner_layers == LEARNER_LAYERS
    image = Image.open(easy_vqa.get_test_image_paths()[0])
    text = chat(processor, "<image>\nwhat shape is it?" if with_image else "what is two plus two?")
    batch = processor(text=text, images=[image] if with_image else None)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = released_logits(t, llm, vision, batch["input_ids"], batch.get("pixel_values"),
                                 model.config.image_token_id)
        no_learners = llm(input_ids=batch["input_ids"]).logits if not with_image else None
    assert (ours - theirs).abs().max() < 1e-4
    if no_learners is not None:  # the learners really changed the output, so the match means something
        assert (theirs - no_learners).abs().max() > 1e-2


def test_compat_generation_and_padded_batch(converted, reference):
    model, processor = converted
    t, llm, vision = reference
    image = Image.open(easy_vqa.get_test_image_paths()[1])
    texts = [chat(processor, "<image>\nwhat colour?"), chat(processor, "say something long, please")]
    batch = processor(text=texts, images=[[image], []], padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)  # recomputes: no cache in compat
        alone = processor(text=texts[0], images=[image])
        ids = alone["input_ids"]
        for _ in range(4):  # the released greedy loop: full recompute per token
            logits = released_logits(t, llm, vision, ids, alone["pixel_values"], model.config.image_token_id)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    width = batch["input_ids"].shape[1]
    assert out[0, width:].tolist() == ids[0, alone["input_ids"].shape[1]:].tolist()
    with pytest.raises(ValueError, match="use_cache=False"):
        model(**alone, use_cache=True, cache=__import__("transformers").DynamicCache())


def test_conversion_report_and_layout(release, converted):
    root, tensors = release
    report = json.loads((root / "converted" / "conversion.json").read_text())
    assert report["loaded"] == len(tensors)
    assert report["layout"]["learner_layers"] == LEARNER_LAYERS and report["layout"]["router_width"] == 4096
    kept = report["kept_from_base"]
    assert kept and all(k.startswith("vision_tower.") and ("layers.2." in k or "head" in k) for k in kept)


@pytest.mark.parametrize("damage, message", [
    ("drop_mlp", "lacks 1 tensors"),
    ("bad_shape", "model.mm_projector.2.weight"),
    ("extra_key", "no place in the model"),
    ("truncated_file", "cannot read"),
    ("missing_shard", "missing from"),
])
def test_damaged_checkpoints_fail_clearly(release, tmp_path, damage, message):
    root, tensors = release
    tensors = dict(tensors)
    if damage == "drop_mlp":
        del tensors["model.layers.1.mlp.down_proj.weight"]
    elif damage == "bad_shape":
        tensors["model.mm_projector.2.weight"] = torch.zeros(H, H - 1)
    elif damage == "extra_key":
        tensors["model.layers.0.attn_pool.q_proj.scale"] = torch.zeros(1)
    write_release(tensors, tmp_path / "src")
    if damage == "truncated_file":
        shard = tmp_path / "src" / "model-00001-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "missing_shard":
        (tmp_path / "src" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        convert_official(tmp_path / "src", tmp_path / "out", root / "llm", root / "vision")
    if damage == "bad_shape":
        assert "(64, 63)" in str(err.value) and "(64, 64)" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
