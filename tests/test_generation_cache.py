"""Cached decoding of a Wings model equals recomputing everything, through every path `generate` takes."""

from __future__ import annotations

import easy_vqa
import pytest
import torch
from PIL import Image

from wings.modeling.cache import WingsDynamicCache

QUESTION = "<|im_start|>user\n{}what shape is in the image?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def images():
    paths = easy_vqa.get_test_image_paths()
    return [Image.open(paths[i]).convert("RGB") for i in range(3)]


@pytest.fixture(scope="module")
def wings_model(make_tiny):
    from conftest import randomize_wings_

    model, processor = make_tiny(seed=1)
    randomize_wings_(model, std=0.3, seed=1)
    return model.eval(), processor


def greedy(model, batch, use_cache, **kw):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=10, do_sample=False, use_cache=use_cache, output_logits=True,
                              return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("n_images", [1, 2, 0])
def test_cached_greedy_equals_recompute(wings_model, images, n_images):
    model, processor = wings_model
    batch = processor(text=QUESTION.format("<image>\n" * n_images), images=images[:n_images] or None)
    cached, full = greedy(model, batch, True), greedy(model, batch, False)
    assert torch.equal(cached.sequences, full.sequences)
    worst = max((a - b).abs().max().item() for a, b in zip(cached.logits, full.logits, strict=True))
    assert worst < 1e-4
    # The learners matter here: with them switched off the logits move by far more than the tolerance.
    assert n_images == 0 or (cached.logits[0] - _logits_without_learners(model, batch)).abs().max() > 1e-2


def _logits_without_learners(model, batch):
    from wings.modeling import wings_modules

    saved = [(m, m.visual, m.textual) for m in wings_modules(model)]
    for m, _, _ in saved:
        m.visual = m.textual = None
    try:
        with torch.no_grad():
            return model(**batch).logits[:, -1]
    finally:
        for m, vis, txt in saved:
            m.visual, m.textual = vis, txt


def test_left_padded_batch_equals_each_prompt_alone(wings_model, images):
    model, processor = wings_model
    prompts = [QUESTION.format("<image>\n"), QUESTION.format("tell me, please, "),
               QUESTION.format("<image> then <image>\n")]
    per_sample = [[images[0]], [], [images[1], images[2]]]
    batch = processor(text=prompts, images=per_sample, padding_side="left")
    out = greedy(model, batch, True)
    width = batch["input_ids"].shape[1]
    for i, (prompt, imgs) in enumerate(zip(prompts, per_sample, strict=True)):
        alone_batch = processor(text=prompt, images=imgs or None)
        alone = greedy(model, alone_batch, True)
        assert out.sequences[i, width:].tolist() == alone.sequences[0, alone_batch["input_ids"].shape[1]:].tolist()
        worst = max((a[i] - b[0]).abs().max().item() for a, b in zip(out.logits, alone.logits, strict=True))
        assert worst < 1e-4


def test_sampling_flags_and_stop_strings_match_uncached(wings_model, images):
    model, processor = wings_model
    batch = processor(text=QUESTION.format("<image>\n"), images=images[:1])
    kw = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3, max_new_tokens=12)
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(model.generate(**batch, use_cache=use_cache, **kw))
    assert torch.equal(outs[0], outs[1])
    new_text = processor.decode(outs[0][0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    stop = new_text.strip()[:2]
    if stop:  # stop strings end generation right after the text appears
        torch.manual_seed(3)
        with torch.no_grad():
            stopped = model.generate(**batch, stop_strings=[stop], tokenizer=processor.tokenizer, **kw)
        stopped_text = processor.decode(stopped[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        assert stop in stopped_text and len(stopped_text) <= len(new_text)


def test_beam_search_reorders_the_learner_cache(wings_model, images):
    model, processor = wings_model
    batch = processor(text=[QUESTION.format("<image> and <image>\n"), QUESTION.format("<image>\n")],
                      images=[images[:2], images[2:]], padding_side="left")
    kw = dict(num_beams=4, num_return_sequences=2, length_penalty=0.0, output_scores=True)
    cached, full = greedy(model, batch, True, **kw), greedy(model, batch, False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    assert torch.allclose(cached.sequences_scores, full.sequences_scores, atol=1e-4)


def test_num_return_sequences_pairs_each_sample_with_its_own_images(wings_model, images):
    model, processor = wings_model
    prompts = [QUESTION.format("<image> and <image>\n"), QUESTION.format("<image>\n")]
    batch = processor(text=prompts, images=[images[:2], images[2:]], padding_side="left")
    out = greedy(model, batch, True, num_beams=2, num_return_sequences=2)
    width = batch["input_ids"].shape[1]
    for i, (prompt, imgs) in enumerate(zip(prompts, [images[:2], images[2:]], strict=True)):
        alone = processor(text=prompt, images=imgs)
        ref = greedy(model, alone, True, num_beams=2, num_return_sequences=2)
        for r in range(2):
            got = out.sequences[2 * i + r, width:].tolist()
            assert got == ref.sequences[r, alone["input_ids"].shape[1]:].tolist()


def test_crop_rolls_the_learner_cache_back(wings_model, images):
    """Prefill prompt + k tokens, crop k, decode: same logits as prefilling the prompt alone (assisted decoding)."""
    model, processor = wings_model
    batch = processor(text=QUESTION.format("<image>\n"), images=images[:1])
    ids, extra = batch["input_ids"], torch.tensor([[11, 12, 13]])
    nxt = torch.tensor([[14]])
    with torch.no_grad():
        cache = WingsDynamicCache(config=model.config.text_config)
        model(input_ids=torch.cat([ids, extra], 1), pixel_values=batch["pixel_values"], cache=cache, use_cache=True)
        cache.crop(-extra.shape[1])
        assert cache.wings_cache.key_positions.shape[1] == ids.shape[1]
        got = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1]
        ref = model(input_ids=torch.cat([ids, nxt], 1), pixel_values=batch["pixel_values"], use_cache=False)
    assert (got - ref.logits[:, -1]).abs().max() < 1e-4


def test_prompt_lookup_decoding_equals_greedy_on_text(wings_model):
    model, processor = wings_model
    batch = processor(text=QUESTION.format("what shape what shape what shape, "))
    with torch.no_grad():
        plain = model.generate(**batch, max_new_tokens=16, do_sample=False)
        lookup = model.generate(**batch, max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(plain, lookup)


def test_image_placeholder_is_never_generated(wings_model, images):
    """A generated `<image>` would have no image to fill it: generation suppresses it, even when it is favoured."""
    model, processor = wings_model
    image_token = model.config.image_token_id
    head = model.get_output_embeddings()
    bias = torch.zeros(head.out_features)
    bias[image_token] = 1e4
    head.bias = torch.nn.Parameter(bias)
    try:
        batch = processor(text=QUESTION.format("<image>\n"), images=images[:1])
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    finally:
        head.bias = None
    assert image_token not in out[0, batch["input_ids"].shape[1]:].tolist()
