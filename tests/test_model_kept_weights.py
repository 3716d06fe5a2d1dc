"""The concatenated low-rank weights kept between inference forwards (learner.kept) never go stale: whatever
happens to the weights (in-place updates, reloads, dtype moves, optimizer steps), a fused forward equals the
reference path (`fused_lowrank=False`, which keeps nothing), and nothing kept under `torch.inference_mode` reaches
a forward that records gradients."""

from __future__ import annotations

import torch

from conftest import randomize_wings_
from test_model_fused import padded_batch, setup


def logits(model, batch, fused: bool) -> torch.Tensor:
    model.wings_kernels.fused_lowrank = fused
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()].float()


def assert_fused_equals_reference(model, batch, tol=1e-5) -> torch.Tensor:
    fused = logits(model, batch, True)
    reference = logits(model, batch, False)
    assert (fused - reference).abs().max() <= tol * max(1.0, reference.abs().max().item())
    return fused


def learner_params(model, kind: str):
    return [p for n, p in model.named_parameters() if f".{kind}." in n]


def test_in_place_updates_and_reloads(make_tiny):
    model, processor = setup(make_tiny)
    batch = padded_batch(processor)
    assert_fused_equals_reference(model, batch)
    attn = model.language_model.model.layers[0].self_attn
    with torch.no_grad():
        attn.textual.q_proj.down.weight.mul_(-2.0)  # in place: same tensor, new version
        attn.visual.o_proj.up.weight.add_(0.5)
    assert_fused_equals_reference(model, batch)
    state = {k: v.clone() * 0.5 if ".visual." in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert_fused_equals_reference(model, batch)


def test_load_state_dict_assign_with_other_weights(make_tiny):
    model, processor = setup(make_tiny)
    batch = padded_batch(processor)
    before = assert_fused_equals_reference(model, batch)
    other = randomize_wings_(setup(make_tiny)[0], std=0.2, seed=7).state_dict()
    model.load_state_dict({k: v.clone() for k, v in other.items()}, assign=True)
    after = assert_fused_equals_reference(model, batch)
    assert (after - before).abs().max() > 1e-2  # the new weights really changed the output


def test_dtype_round_trip(make_tiny):
    model, processor = setup(make_tiny)
    batch = padded_batch(processor)
    first = assert_fused_equals_reference(model, batch)
    model.to(torch.bfloat16)
    half = {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}
    assert_fused_equals_reference(model, half, tol=3e-2)
    model.to(torch.float32)
    again = assert_fused_equals_reference(model, batch)
    assert (again - first).abs().max() > 0  # the weights went through bf16: not the first model's output


def test_inference_mode_forward_then_training_forward(make_tiny):
    """A frozen learner (stage 1 trains the visual learner, not the textual one) keeps no weights built under
    inference_mode for a forward that records gradients: the backward runs and equals the reference path's."""
    model, processor = setup(make_tiny)
    batch = padded_batch(processor)
    with torch.inference_mode():
        model(**batch)  # an evaluation (or a served request) between training steps
    for p in learner_params(model, "textual"):
        p.requires_grad_(False)
    real = batch["attention_mask"].bool()

    def grads(fused: bool) -> dict[str, torch.Tensor]:
        model.wings_kernels.fused_lowrank = fused
        model.zero_grad(set_to_none=True)
        model(**batch).logits[real].float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, reference = grads(True), grads(False)
    assert fused.keys() == reference.keys() and any(".visual." in n for n in fused)
    for name, grad in reference.items():
        assert (fused[name] - grad).abs().max() <= 1e-4 * max(1e-3, grad.abs().max().item()), name


def test_optimizer_step_then_evaluation(make_tiny):
    model, processor = setup(make_tiny)
    batch = padded_batch(processor)
    before = assert_fused_equals_reference(model, batch)
    params = learner_params(model, "visual") + learner_params(model, "textual")
    optimizer = torch.optim.AdamW(params, lr=0.05)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        model(**batch).logits[batch["attention_mask"].bool()].square().mean().backward()
        optimizer.step()
        after = assert_fused_equals_reference(model, batch)
    assert (after - before).abs().max() > 1e-3
