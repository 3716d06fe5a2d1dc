"""Every fast path of the Wings layer equals its reference path (modeling/kernels.py), forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize_wings_
from wings.modeling.buffers import ColumnBuffer

PROMPT_LAYOUTS = (["t4", "i", "t9"], ["t3", "i", "t6", "i", "t2"], ["t12"])


def setup(make_tiny, llm="qwen2", **kw):
    model, processor = make_tiny(llm=llm, **kw)
    randomize_wings_(model, std=0.2)
    return model.eval(), processor


def padded_batch(processor, side="left"):
    """Three samples (one image, two images, text only) in one padded batch, and their images."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for layout in PROMPT_LAYOUTS:
        ids = []
        for part in layout:
            if part == "i":
                ids += [processor.image_token_id] * processor.image_seq_length
            else:
                ids += torch.randint(10, 300, (int(part[1:]),), generator=gen).tolist()
        rows.append(ids)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, sl], mask[i, sl] = torch.tensor(row), 1
    side_px = processor.image_processor.size.get("height") or processor.image_processor.size["shortest_edge"]
    pixels = torch.randn(3, 3, side_px, side_px, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def run(model, batch, **kernels):
    """Logits, recorded router weights, and the gradients of a loss on the real tokens."""
    for name, value in kernels.items():
        setattr(model.wings_kernels, name, value)
    model.zero_grad(set_to_none=True)
    record = {}
    out = model(**batch, wings_record=record)
    real = batch["attention_mask"].bool()
    (out.logits[real].float().square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach()[real], {k: v[real] for k, v in record.items()}, grads


def assert_same(a, b, tol):
    logits_a, rec_a, grads_a = a
    logits_b, rec_b, grads_b = b
    scale = max(1.0, logits_b.abs().max().item())
    assert (logits_a - logits_b).abs().max() <= tol * scale
    assert rec_a.keys() == rec_b.keys() and rec_a
    for layer in rec_a:
        assert (rec_a[layer] - rec_b[layer]).abs().max() <= tol
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        g_scale = max(1e-3, grads_b[name].abs().max().item())
        assert (grads_a[name] - grads_b[name]).abs().max() <= tol * 10 * g_scale, name


@pytest.mark.parametrize("router", ["position", "segment"])
@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_router_value_channels_equal_separate_pass(make_tiny, llm, router):
    """The summary as extra value channels of the main SDPA call == a second SDPA pass == eager probabilities."""
    model, processor = setup(make_tiny, llm=llm, router=router)
    batch = padded_batch(processor)
    fused = run(model, batch, fused_router=True)
    separate = run(model, batch, fused_router=False)
    assert_same(fused, separate, 1e-5)
    model.config.router_impl = "eager"
    assert_same(fused, run(model, batch, fused_router=False), 1e-5)


def test_router_value_channels_in_bf16(make_tiny):
    model, processor = setup(make_tiny)
    model.to(torch.bfloat16)
    batch = padded_batch(processor, side="right")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        model.wings_kernels.fused_router = True
        a = model(**batch).logits
        model.wings_kernels.fused_router = False
        b = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert (a[real] - b[real]).abs().max() <= 3e-2 * max(1.0, b[real].abs().max().item())


def test_eager_main_attention_shares_its_probabilities(make_tiny):
    """With an eager main attention the router reads its probabilities; same result as SDPA + separate pass."""
    model, processor = setup(make_tiny)
    batch = padded_batch(processor)
    reference = run(model, batch, fused_router=False)
    model.language_model.set_attn_implementation("eager")
    assert_same(run(model, batch, fused_router=True), reference, 1e-5)


@pytest.mark.parametrize("router", ["position", "segment"])
def test_decoding_with_shared_probabilities_equals_reference(make_tiny, router):
    """Cached decoding (one query: the router reads the main attention's probabilities) == the reference."""
    model, processor = setup(make_tiny, router=router)
    batch = padded_batch(processor)
    steps = torch.randint(10, 300, (3, 4), generator=torch.Generator().manual_seed(1))

    def decode(fused: bool):
        model.wings_kernels.fused_router = fused
        cache, mask, logits, record = None, batch["attention_mask"], [], {}
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            cache = out.cache
            for t in range(steps.shape[1]):
                mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
                out = model(input_ids=steps[:, t:t + 1], attention_mask=mask, cache=cache, use_cache=True,
                            wings_record=record)
                logits.append(out.logits[:, -1])
        return torch.stack(logits), record

    (a, rec_a), (b, rec_b) = decode(True), decode(False)
    assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    assert all((rec_a[k] - rec_b[k]).abs().max() <= 1e-5 for k in rec_b)


def test_fused_lowrank_projections_equal_separate(make_tiny):
    model, processor = setup(make_tiny)
    model.train()
    batch = padded_batch(processor)
    assert_same(run(model, batch, fused_lowrank=True), run(model, batch, fused_lowrank=False), 1e-5)


def test_learner_recompute_keeps_loss_and_gradients(make_tiny):
    model, processor = setup(make_tiny)
    model.train()
    batch = padded_batch(processor)
    kept = run(model, batch, learner_recompute=False)
    assert_same(run(model, batch, learner_recompute=True), kept, 1e-6)


def test_learner_recompute_inside_gradient_checkpointing(make_tiny):
    model, processor = setup(make_tiny)
    reference = copy.deepcopy(model).train()
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = padded_batch(processor)
    assert_same(run(model, batch, learner_recompute=True), run(reference, batch), 1e-6)


def test_column_buffer_appends_in_place_and_keeps_order():
    buf = ColumnBuffer(torch.arange(6).view(2, 3), dim=1)
    for k in range(5):
        buf.append(torch.full((2, 1), 10 + k))
    assert buf.length == 8 and buf.capacity >= 8
    assert buf.view.tolist() == [[0, 1, 2, 10, 11, 12, 13, 14], [3, 4, 5, 10, 11, 12, 13, 14]]
    storage = buf.storage
    buf.truncate(4)
    buf.append(torch.full((2, 1), 99))
    assert buf.storage is storage and buf.view[:, -1].tolist() == [99, 99]  # reused, not reallocated
    buf.select_batch(torch.tensor([1, 1]))
    assert buf.view.tolist() == [[3, 4, 5, 10, 99]] * 2
    grad = ColumnBuffer(torch.zeros(1, 2, requires_grad=True), dim=1)
    grad.append(torch.ones(1, 1))
    assert grad.view.requires_grad and grad.view.shape == (1, 3)  # autograd: functional concatenation


def test_inference_keeps_fused_weights_only_while_they_are_unchanged(make_tiny):
    """The concatenated low-rank weights kept between inference forwards follow in-place updates and reloads."""
    model, processor = setup(make_tiny)
    batch = padded_batch(processor)

    def logits(fused: bool) -> torch.Tensor:
        model.wings_kernels.fused_lowrank = fused
        with torch.no_grad():
            return model(**batch).logits[batch["attention_mask"].bool()]

    assert (logits(True) - logits(False)).abs().max() < 1e-5
    attn = model.language_model.model.layers[0].self_attn
    with torch.no_grad():
        attn.textual.q_proj.down.weight.mul_(-2.0)  # in place: same tensor, new version
        attn.visual.o_proj.up.weight.add_(0.5)
    assert (logits(True) - logits(False)).abs().max() < 1e-5
    state = {k: v.clone() * 0.5 if ".visual." in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert (logits(True) - logits(False)).abs().max() < 1e-5
