"""Every fast path of the Wings layer equals its reference path (modeling/kernels.py), forward and backward."""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import randomize_wings_
from test_model_invariants import make_ids
from wings.modeling.buffers import ColumnBuffer
from wings.modeling.router import RouterProbe, router_mask, router_probe_fusable

PROMPT_LAYOUTS = (["t4", "i", "t9"], ["t3", "i", "t6", "i", "t2"], ["t12"])


def setup(make_tiny, llm="qwen2", **kw):
    model, processor = make_tiny(llm=llm, **kw)
    randomize_wings_(model, std=0.2)
    return model.eval(), processor


def padded_batch(processor, side="left"):
    """Three samples (one image, two images, text only) in one padded batch, and their images."""
    rows = [make_ids(processor, layout, seed=i)[0].tolist() for i, layout in enumerate(PROMPT_LAYOUTS)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, sl], mask[i, sl] = torch.tensor(row), 1
    side_px = processor.image_processor.size.get("height") or processor.image_processor.size["shortest_edge"]
    pixels = torch.randn(3, 3, side_px, side_px, generator=torch.Generator().manual_seed(0))
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
        cache, mask, logits, records = None, batch["attention_mask"], [], []
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            cache = out.cache
            for t in range(steps.shape[1]):
                mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
                records.append({})
                out = model(input_ids=steps[:, t:t + 1], attention_mask=mask, cache=cache, use_cache=True,
                            wings_record=records[-1])
                logits.append(out.logits[:, -1])
        return torch.stack(logits), records

    (a, rec_a), (b, rec_b) = decode(True), decode(False)
    assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    assert len(rec_a) == len(rec_b) == steps.shape[1]
    for step_a, step_b in zip(rec_a, rec_b, strict=True):  # every decoding step, every layer with a router
        assert step_a and step_a.keys() == step_b.keys()
        for layer in step_b:
            assert (step_a[layer] - step_b[layer]).abs().max() <= 1e-5, layer


def test_fused_lowrank_projections_equal_separate(make_tiny):
    model, processor = setup(make_tiny)
    model.train()
    batch = padded_batch(processor)
    assert_same(run(model, batch, fused_lowrank=True), run(model, batch, fused_lowrank=False), 1e-5)


@pytest.mark.parametrize("policy", [True, "projections"])
def test_learner_recompute_keeps_loss_and_gradients(make_tiny, policy):
    model, processor = setup(make_tiny)
    model.train()
    batch = padded_batch(processor)
    kept = run(model, batch, learner_recompute=False)
    assert_same(run(model, batch, learner_recompute=policy), kept, 1e-6)


class ForwardOpCalls(TorchDispatchMode):
    """Counts, while active, the fused attention kernels run (forward ones, not their backward ops) and the
    `baddbmm`s (in a Wings forward only the fused low-rank up-projections use it; their backward does not)."""

    def __init__(self):
        super().__init__()
        self.attention = self.baddbmm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        self.attention += name.startswith("aten::_scaled_dot_product") and "backward" not in name
        self.baddbmm += name == "aten::baddbmm"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy, attention_replays", [(False, 0), (True, 4), ("projections", 0)])
def test_learner_recompute_policy_decides_what_the_backward_replays(make_tiny, policy, attention_replays):
    """Full recompute runs each learner's attention again in the backward; "projections" keeps the attention
    outputs and replays only the projections around them (2 layers x 2 learners, ungrouped: one call each);
    without recompute nothing is replayed."""
    model, processor = setup(make_tiny)
    model.train()
    model.wings_kernels.learner_recompute = policy
    model.wings_kernels.grouped_learners = False
    loss = model(**padded_batch(processor)).logits.float().square().mean()
    with ForwardOpCalls() as counter:
        loss.backward()
    assert counter.attention == attention_replays
    assert (counter.baddbmm > 0) == bool(policy)


def test_learner_activations_under_autocast_keep_no_wide_extras(make_tiny):
    """Under bf16 autocast what the learners save for the backward is bf16 (no fp32 copy of h' or the rows), and
    a learner's values do not keep its keys before RoPE alive (the fused key/value pair is one tensor)."""
    model, processor = setup(make_tiny)
    model.train()
    batch = padded_batch(processor)
    B, T = batch["input_ids"].shape
    width = model.config.text_config.hidden_size
    learner_files = ("modeling/grouped.py", "modeling/learner.py", "modeling/attention.py")
    saved = []

    def pack(t):
        if any(f.filename.endswith(learner_files) for f in traceback.extract_stack()):
            saved.append((t.dtype, t.numel(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch)
    assert saved
    assert not [s for s in saved if s[0] == torch.float32 and s[1] >= B * T * width]
    head_dim = width // model.config.text_config.num_attention_heads
    keys = model.language_model.model.layers[0].self_attn.visual.project_keys(
        torch.randn(B, 7, width), torch.arange(7).expand(B, 7), torch.ones(B, 7, dtype=torch.bool),
        torch.ones(B, 7, head_dim), torch.zeros(B, 7, head_dim), fused_lowrank=True)
    assert keys.value.untyped_storage().nbytes() == keys.value.numel() * keys.value.element_size()


def test_learner_recompute_rejects_an_unknown_policy(make_tiny):
    model, processor = setup(make_tiny)
    model.train()
    model.wings_kernels.learner_recompute = "attention"
    with pytest.raises(ValueError, match="learner_recompute must be"):
        model(**padded_batch(processor))


def test_fast_paths_under_bf16_autocast(make_tiny):
    """Mixed precision as the Trainer runs it (fp32 weights, bf16 autocast): the fast paths (grouped learner
    attention, fused low-rank projections, learner recompute) agree with the reference paths to bf16 precision,
    and recompute is exact against keeping the activations (it replays the same bf16 operations)."""
    model, processor = setup(make_tiny)
    model.train()
    batch = padded_batch(processor)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = run(model, batch, grouped_learners=False, fused_lowrank=False, learner_recompute=False)
        fast = run(model, batch, grouped_learners=True, fused_lowrank=True, learner_recompute=False)
        recomputed = [run(model, batch, grouped_learners=True, fused_lowrank=True, learner_recompute=policy)
                      for policy in (True, "projections")]
    assert reference[0].dtype == torch.bfloat16
    for result in recomputed:
        assert_same(result, fast, 1e-6)
    assert_same(fast, reference, 1.5e-2)  # measured: logits 0.005, gradients 0.006 (relative to their largest)


@pytest.mark.parametrize("policy", [True, "projections"])
def test_learner_recompute_inside_gradient_checkpointing(make_tiny, policy):
    model, processor = setup(make_tiny)
    reference = copy.deepcopy(model).train()
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = padded_batch(processor)
    assert_same(run(model, batch, learner_recompute=policy), run(reference, batch), 1e-6)


def test_column_buffer_appends_in_place_and_keeps_order():
    first = torch.arange(6).view(2, 3)
    with torch.no_grad():  # an inference cache: in place, spare capacity
        buf = ColumnBuffer(first, dim=1)
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


def test_column_buffer_never_writes_into_the_callers_tensor():
    first = torch.arange(6).view(2, 3)
    with torch.no_grad():
        buf = ColumnBuffer(first, dim=1)
        buf.truncate(2)  # (a crop) the next append lands where the caller's last column was
        buf.append(torch.full((2, 1), 99))
        buf.view.fill_(-1)
    assert first.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_column_buffer_with_grad_enabled_keeps_what_autograd_saved():
    """With autograd on, even a tensor that needs no gradient may be saved by an op (a matmul's other input): an
    append must not modify it in place."""
    weight = torch.ones(2, 1, requires_grad=True)
    buf = ColumnBuffer(torch.ones(1, 2), dim=1)
    losses = []
    for _ in range(3):
        losses.append((buf.view @ weight[:buf.length]).sum())  # saves buf.view for weight's gradient
        buf.append(torch.ones(1, 1))
        weight = torch.cat([weight, torch.ones(1, 1)])
    sum(losses).backward()  # "modified by an inplace operation" if an append wrote into a saved storage


@pytest.mark.parametrize("router", ["segment", "position"])
def test_cached_forwards_with_grad_enabled_backpropagate_as_recompute(make_tiny, router):
    """Prefill and two cached decoding steps with autograd on (no `torch.no_grad`), then one backward: the cache
    buffers the forwards saved are not overwritten, and the gradients equal a forward without a cache."""
    model, processor = setup(make_tiny, router=router)
    batch = padded_batch(processor)
    steps = torch.randint(10, 300, (3, 2), generator=torch.Generator().manual_seed(2))
    mask = batch["attention_mask"]

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out = model(**batch, use_cache=True)
    logits = []
    for t in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        out = model(input_ids=steps[:, t:t + 1], attention_mask=mask, cache=out.cache, use_cache=True)
        logits.append(out.logits[:, -1])
    cached = grads(torch.stack(logits).square().mean())
    full = model(input_ids=torch.cat([batch["input_ids"], steps], 1), attention_mask=mask,
                 pixel_values=batch["pixel_values"])
    recomputed = grads(full.logits[:, -steps.shape[1]:].transpose(0, 1).square().mean())
    assert cached.keys() == recomputed.keys() and any(".textual." in n for n in cached)
    for name, grad in recomputed.items():
        assert (cached[name] - grad).abs().max() <= 1e-4 * max(1e-3, grad.abs().max().item()), name


def probe_case(T: int = 1):
    """Random attention inputs (4 query heads over 2 KV heads, row 0 left-padded by 2 columns) and router values;
    the 2-D key mask a flash kernel gets, and the probe's own [B, 1, T, S] mask."""
    gen = torch.Generator().manual_seed(3)
    B, H, Hkv, S, D, C = 2, 4, 2, 6, 8, 2
    q, k, v = (torch.randn(B, h, n, D, generator=gen) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :2] = False
    key_positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    query_positions = key_positions[:, -T:]
    return (q, k, v), torch.randn(B, S, C, generator=gen), valid, router_mask(query_positions, key_positions, valid)


def fake_flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Stands in for a kernel with its own mask conventions (here: a 2-D key mask, or none); [B, T, H, D] out."""
    mask = attention_mask[:, None, None, :] if torch.is_tensor(attention_mask) else None
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2), None


@pytest.mark.parametrize("base_impl, mask_kind", [("flash_attention_2", "2d"), ("flash_attention_2", "none"),
                                                  ("flex_attention", "object")])
def test_router_probe_falls_back_for_other_kernels_and_masks(base_impl, mask_kind):
    """A kernel other than sdpa/eager, or a mask that is not a 4-D tensor (FA2's [B, S], flex's BlockMask), takes
    the reference path (the kernel itself, then a separate router pass): same output and summary as asking for
    the reference."""
    (q, k, v), values, valid, probe_mask = probe_case()
    attention_mask = {"2d": valid, "none": None, "object": object()}[mask_kind]
    assert not router_probe_fusable(base_impl, attention_mask, {})
    results = []
    for fused in (True, False):
        probe = RouterProbe(values, lambda: probe_mask, "sdpa", fused=fused)
        out, _ = probe.attend(base_impl, fake_flash, None, q, k, v, attention_mask, None, 0.0)
        results.append((out, probe.summary))
    (out, summary), (ref_out, ref_summary) = results
    assert torch.equal(out, ref_out) and torch.equal(summary, ref_summary)
    expected, _ = fake_flash(None, q, k, v, attention_mask)
    assert (out - expected).abs().max() < 1e-6


@pytest.mark.parametrize("base_impl, mask, kwargs, fusable", [
    ("sdpa", None, {}, True),
    ("sdpa", torch.ones(2, 1, 1, 6, dtype=torch.bool), {}, True),
    ("eager", torch.zeros(2, 1, 1, 6), {}, True),
    ("sdpa", torch.ones(2, 6, dtype=torch.bool), {}, False),
    ("flash_attention_2", None, {}, False),
    ("flex_attention", object(), {}, False),
    ("eager", torch.zeros(2, 1, 1, 6), {"softcap": 30.0}, False),
    ("eager", torch.zeros(2, 1, 1, 6), {"s_aux": torch.zeros(4)}, False),
    ("sdpa", None, {"softcap": None, "sliding_window": None}, True),
])
def test_router_probe_dispatch_decision(base_impl, mask, kwargs, fusable):
    assert router_probe_fusable(base_impl, mask, kwargs) is fusable


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("router", ["position", "segment"])
def test_grouped_learner_attention_equals_masked(make_tiny, side, router):
    """Queries grouped by token kind (causal over their own kind + the other kind over the keys it can see) ==
    every query against every key under the mask, forward and backward; padded batches with one image, two images,
    no image, and an image before any text (the textual learner's image queries then see no key)."""
    model, processor = setup(make_tiny, router=router)
    model.train()
    layouts = (*PROMPT_LAYOUTS, ["i", "t5"])
    rows = [make_ids(processor, layout, seed=i)[0].tolist() for i, layout in enumerate(layouts)]
    width = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, sl], mask[i, sl] = torch.tensor(row), 1
    side_px = processor.image_processor.size.get("height") or processor.image_processor.size["shortest_edge"]
    batch = {"input_ids": ids, "attention_mask": mask,
             "pixel_values": torch.randn(4, 3, side_px, side_px, generator=torch.Generator().manual_seed(0))}
    reference = run(model, batch, grouped_learners=False)
    assert_same(run(model, batch, grouped_learners=True), reference, 1e-5)
    assert_same(run(model, batch, grouped_learners=True, learner_recompute=True), reference, 1e-5)
