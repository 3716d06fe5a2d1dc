"""DESIGN.md section 1 invariants, over decoder families, vision encoders and dtypes (tiny random models)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize_wings_
from wings.modeling import detach_learners

FAMILIES = ["qwen2", "llama", "mistral", "qwen3"]
VISIONS = ["siglip", "clip"]
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def image_batch(processor, n_images: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    size = processor.image_processor.size
    side = size.get("height") or size.get("shortest_edge")
    return torch.randn(n_images, 3, side, side, generator=gen)


def make_ids(processor, layout: list[str], seed: int = 0) -> torch.Tensor:
    """layout: e.g. ["t5", "i", "t7"] = 5 text tokens, one image's tokens, 7 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for part in layout:
        if part == "i":
            ids += [processor.image_token_id] * processor.image_seq_length
        else:
            ids += torch.randint(10, 300, (int(part[1:]),), generator=gen).tolist()
    return torch.tensor([ids])


def setup(make_tiny, llm="qwen2", vision="siglip", dtype=torch.float32, randomize=True, **kw):
    model, processor = make_tiny(llm=llm, vision=vision, **kw)
    if randomize:
        randomize_wings_(model)
    return model.to(dtype).eval(), processor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("llm", FAMILIES)
def test_fresh_learners_equal_base_llm_text_only(make_tiny, llm, dtype):
    model, processor = setup(make_tiny, llm=llm, dtype=dtype, randomize=False)
    base = detach_learners(copy.deepcopy(model.language_model))
    ids = make_ids(processor, ["t24"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("vision", VISIONS)
@pytest.mark.parametrize("llm", FAMILIES)
def test_fresh_learners_equal_llava_mode_with_images(make_tiny, llm, vision):
    wings_model, processor = setup(make_tiny, llm=llm, vision=vision, randomize=False)
    llava_model, _ = setup(make_tiny, llm=llm, vision=vision, randomize=False, mode="llava")
    ids = make_ids(processor, ["t4", "i", "t6", "i", "t3"])
    pixels = image_batch(processor, 2)
    with torch.no_grad():
        a = wings_model(input_ids=ids, pixel_values=pixels).logits
        b = llava_model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(a, b)


def test_randomised_learners_change_the_output(make_tiny):
    """Guards the other tests: with random learners the Wings path must actually matter."""
    model, processor = setup(make_tiny)
    base = detach_learners(copy.deepcopy(model.language_model))
    ids = make_ids(processor, ["t4", "i", "t10"])
    with torch.no_grad():
        wings_logits = model(input_ids=ids, pixel_values=image_batch(processor, 1)).logits
        text_logits = model(input_ids=make_ids(processor, ["t20"])).logits
        base_text = base(input_ids=make_ids(processor, ["t20"])).logits
    assert (text_logits - base_text).abs().max() > 1e-2
    assert torch.isfinite(wings_logits).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("router", ["position", "segment"])
@pytest.mark.parametrize(
    "llm,vision", [("qwen2", "siglip"), ("llama", "clip"), ("mistral", "siglip"), ("qwen3", "clip")]
)
def test_causality_with_and_without_images(make_tiny, llm, vision, router, dtype):
    model, processor = setup(make_tiny, llm=llm, vision=vision, dtype=dtype, router=router)
    with torch.no_grad():
        for p in model.parameters():  # randomise *all* weights, not only the learners
            p.add_(torch.randn_like(p) * 0.05)
    layout = ["t5", "i", "t6", "i", "t4"]
    ids = make_ids(processor, layout)
    pixels = image_batch(processor, 2).to(dtype)
    p = 5 + processor.image_seq_length + 3  # a text position between the two images
    ids2 = ids.clone()
    ids2[0, p + 1:] = torch.where(ids[0, p + 1:] == processor.image_token_id, ids[0, p + 1:], ids[0, p + 1:] + 1)
    pixels2 = pixels.clone()
    pixels2[1] = torch.randn_like(pixels2[1])  # the second image sits after p
    with torch.no_grad():
        full_a = model(input_ids=ids, pixel_values=pixels).logits[0]
        full_b = model(input_ids=ids2, pixel_values=pixels2).logits[0]
        assert torch.equal(full_a[: p + 1], full_b[: p + 1])
        assert (full_a[p + 1:] - full_b[p + 1:]).abs().max() > 0  # the change itself is visible later
        text = make_ids(processor, ["t20"])
        text2 = text.clone()
        text2[0, 11:] += 1
        assert torch.equal(model(input_ids=text).logits[0, :11], model(input_ids=text2).logits[0, :11])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("router", ["position", "segment"])
def test_padded_batch_equals_per_sample(make_tiny, side, router, dtype):
    """Multi-image, single-image and text-only samples in one padded batch == each sample alone."""
    model, processor = setup(make_tiny, router=router, dtype=dtype)
    layouts = [["t3", "i", "t5", "i", "t2"], ["t9"], ["t2", "i", "t12"]]
    n_images = [2, 0, 1]
    samples = [make_ids(processor, lay, seed=i)[0] for i, lay in enumerate(layouts)]
    pixels = image_batch(processor, sum(n_images)).to(dtype)
    width = max(len(s) for s in samples)
    pad_id = 0
    ids = torch.full((len(samples), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    with torch.no_grad():
        batch_logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        start = 0
        for i, s in enumerate(samples):
            own = pixels[start:start + n_images[i]] if n_images[i] else None
            start += n_images[i]
            alone = model(input_ids=s[None], pixel_values=own).logits[0]
            got = batch_logits[i][mask[i].bool()]
            assert (got - alone).abs().max() <= TOL[dtype] * max(1.0, alone.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("router", ["position", "segment"])
@pytest.mark.parametrize("llm", ["qwen2", "llama", "qwen3"])
def test_sdpa_router_equals_eager_router(make_tiny, llm, router, dtype):
    model, processor = setup(make_tiny, llm=llm, router=router, dtype=dtype)
    ids = torch.cat([make_ids(processor, ["t4", "i", "t9"]), make_ids(processor, ["t3", "i", "t10"], seed=1)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # some left padding
    pixels = image_batch(processor, 2).to(dtype)
    with torch.no_grad():
        rec_sdpa, rec_eager = {}, {}
        a = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, wings_record=rec_sdpa).logits
        model.config.router_impl = "eager"
        b = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, wings_record=rec_eager).logits
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for layer in rec_sdpa:
        assert (rec_sdpa[layer] - rec_eager[layer]).abs().max() <= tol
    assert (a - b).abs().max() <= tol * max(1.0, a.abs().max().item())


def test_router_weights_are_a_distribution_and_vary_per_token(make_tiny):
    model, processor = setup(make_tiny)
    rec = {}
    with torch.no_grad():
        model(input_ids=make_ids(processor, ["t4", "i", "t9"]), pixel_values=image_batch(processor, 1),
              wings_record=rec)
    assert set(rec) == {0, 1}
    w = rec[0]
    assert w.shape[-1] == 2 and torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]))
    assert w[0, :, 0].std() > 0  # token-wise routing


@pytest.mark.parametrize("llm", FAMILIES)
def test_detach_restores_base_model(make_tiny, llm):
    model, processor = setup(make_tiny, llm=llm)
    plain, _ = setup(make_tiny, llm=llm, randomize=False, mode="llava")
    llm_module = detach_learners(model.language_model)
    assert set(llm_module.state_dict()) == set(plain.language_model.state_dict())
    ids = make_ids(processor, ["t16"])
    with torch.no_grad():
        assert torch.equal(llm_module(input_ids=ids).logits, plain.language_model(input_ids=ids).logits)


def test_fully_masked_learner_rows_are_zero_not_nan(make_tiny):
    """Text before the first image sees no visual key: its visual learner output is exactly 0."""
    model, processor = setup(make_tiny, use_textual_learner=False, use_router=False)
    llava, _ = setup(make_tiny, randomize=False, mode="llava")
    ids = make_ids(processor, ["t6", "i", "t4"])
    pixels = image_batch(processor, 1)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits
        b = llava(input_ids=ids, pixel_values=pixels).logits
    assert torch.isfinite(a).all()
    assert torch.equal(a[0, :6], b[0, :6])  # stage-1: only the visual learner, which is 0 before the image
    assert (a[0, 6:] - b[0, 6:]).abs().max() > 0


def test_gradients_reach_learners_router_and_projector(make_tiny):
    model, processor = setup(make_tiny)
    model.train()
    ids = torch.cat([make_ids(processor, ["t4", "i", "t9"]), make_ids(processor, ["t29"])])
    out = model(input_ids=ids, pixel_values=image_batch(processor, 1), labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        if any(k in name for k in (".visual.", ".textual.", ".router.", "projector.")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".router." in n)
