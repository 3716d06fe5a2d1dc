"""Router modes (learned / fixed / modality) and the softmax temperature: exact weights, saved with the model,
validated on the config, and trainable without leaving the unused router out of the gradient."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from wings import WingsConfig
from wings.builder import save


def batch(processor, with_image: list[bool]):
    """A padded batch of chat prompts, some with one image (a 32x32 solid colour), some text-only."""
    texts, images = [], []
    for k, has in enumerate(with_image):
        content = ([{"type": "image"}] if has else []) + [{"type": "text", "text": f"what colour is it {k}?"}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   tokenize=False))
        images += [[Image.new("RGB", (32, 32), (40 * k, 90, 200))]] if has else [[]]
    images = images if any(with_image) else None
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def recorded(model, inputs) -> dict[int, torch.Tensor]:
    record: dict = {}
    with torch.no_grad():
        model(**inputs, use_cache=False, wings_record=record)
    return record


@pytest.fixture
def routed(make_tiny, randomize):
    """A tiny Wings model with both learners, a segment router, and random (non-zero) Wings weights."""
    model, processor = make_tiny(router="segment")
    return randomize(model, std=0.5).eval(), processor


def test_fixed_router_gives_exactly_one_half_at_every_token(routed):
    model, processor = routed
    model.config.router_mode = "fixed"
    inputs = batch(processor, [True, False, True])
    record = recorded(model, inputs)
    assert len(record) == model.config.text_config.num_hidden_layers
    for weights in record.values():
        assert torch.equal(weights, torch.full_like(weights, 0.5))


def test_modality_router_gives_exactly_one_or_zero_by_sample(routed):
    model, processor = routed
    model.config.router_mode = "modality"
    inputs = batch(processor, [True, False, True, False])
    for weights in recorded(model, inputs).values():
        expected = torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None].expand(weights.shape[:2])
        assert torch.equal(weights[..., 0], expected) and torch.equal(weights[..., 1], 1 - expected)


def test_learned_router_differs_from_both_ablations(routed):
    """The modes really change what the model computes (else the equality tests above could pass vacuously)."""
    model, processor = routed
    inputs = batch(processor, [True, True])
    logits = {}
    for mode in ("learned", "fixed", "modality"):
        model.config.router_mode = mode
        with torch.no_grad():
            logits[mode] = model(**inputs, use_cache=False).logits
    assert not torch.allclose(logits["learned"], logits["fixed"])
    assert not torch.allclose(logits["learned"], logits["modality"])


def test_temperature_divides_the_routers_softmax_input(routed):
    model, processor = routed
    inputs = batch(processor, [True, False])
    base = recorded(model, inputs)
    model.config.router_temperature = 0.25
    sharp = recorded(model, inputs)
    valid = inputs["attention_mask"].bool()
    # The first layer's router input does not depend on routing (later layers' inputs do): its softmax input gap
    # log(w_v / w_t) is exactly divided by the temperature.
    first = min(base)
    gap = (base[first][..., 0].log() - base[first][..., 1].log())[valid]
    sharp_gap = (sharp[first][..., 0].log() - sharp[first][..., 1].log())[valid]
    torch.testing.assert_close(sharp_gap, gap / 0.25, rtol=1e-4, atol=1e-4)
    assert gap.abs().max() > 0.05  # a router that routes at all, so the test can tell
    for layer, w in base.items():  # every layer's weights move away from 0.5
        assert (sharp[layer][..., 0] - 0.5).abs()[valid].mean() > (w[..., 0] - 0.5).abs()[valid].mean()


def test_mode_and_temperature_are_saved_and_reloaded(routed, tmp_path):
    model, processor = routed
    model.config.router_mode = "modality"
    model.config.router_temperature = 0.5
    out = save(model, processor, tmp_path / "m")
    saved = json.loads((out / "config.json").read_text())
    assert saved["router_mode"] == "modality" and saved["router_temperature"] == 0.5
    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    inputs = batch(processor, [True, False])
    for layer, weights in recorded(loaded, inputs).items():
        assert torch.equal(weights, recorded(model, inputs)[layer])
    assert torch.equal(weights[1], torch.zeros_like(weights[1]).index_fill_(-1, torch.tensor([1]), 1.0))


@pytest.mark.parametrize("field, value, message", [
    ("router_mode", "sticky", "router_mode must be one of"),
    ("router_temperature", 0.0, "router_temperature must be a positive number"),
    ("router_temperature", float("inf"), "router_temperature must be a positive number"),
    ("router_temperature", "hot", "router_temperature must be a positive number"),
])
def test_bad_router_fields_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        WingsConfig(**{field: value})


@pytest.mark.parametrize("mode", ["fixed", "modality"])
def test_an_unread_router_still_gets_a_zero_gradient_when_it_trains(routed, mode):
    """DDP without the unused-parameter search needs a gradient for every trainable parameter each step."""
    model, processor = routed
    model.config.router_mode = mode
    model.train()
    inputs = batch(processor, [True, False])
    model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    assert routers and all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in routers)
