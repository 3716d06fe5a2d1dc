"""The same model, cache and training recipe on a CUDA device, in fp32 and bf16. Skipped where there is no GPU
(CI has none); run on a GPU machine with `pytest tests/test_cuda.py`."""

from __future__ import annotations

import copy

import easy_vqa
import pytest
import torch
from PIL import Image

from conftest import randomize_wings_
from wings.builder import save

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
PROMPT = "<|im_start|>user\n{}what shape is in the image?<|im_end|>\n<|im_start|>assistant\n"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def images():
    paths = easy_vqa.get_test_image_paths()
    return [Image.open(paths[i]).convert("RGB") for i in range(3)]


def wings_on(make_tiny, device, dtype, **kw):
    model, processor = make_tiny(seed=3, **kw)
    randomize_wings_(model, std=0.2, seed=3)
    return model.to(device=device, dtype=dtype).eval(), processor


def on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("router", ["position", "segment"])
def test_cuda_fp32_matches_cpu_and_bf16_stays_close(make_tiny, images, router):
    cpu_model, processor = wings_on(make_tiny, "cpu", torch.float32, router=router)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    batch = processor(text=PROMPT.format("<image>\n<image>\n"), images=images[:2])
    with torch.no_grad():
        ref = cpu_model(**batch).logits
        fp32 = gpu_model(**on(batch, CUDA)).logits
        bf16 = gpu_model.to(torch.bfloat16)(**on(batch, CUDA)).logits
    assert rel_err(fp32, ref) < 1e-4
    assert rel_err(bf16, ref) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sdpa_router_equals_eager_router(make_tiny, images, dtype):
    sdpa, processor = wings_on(make_tiny, CUDA, dtype, router_impl="sdpa")
    eager, _ = wings_on(make_tiny, CUDA, dtype, router_impl="eager")
    batch = on(processor(text=PROMPT.format("<image>\n"), images=images[:1]), CUDA)
    with torch.no_grad():
        assert rel_err(sdpa(**batch).logits, eager(**batch).logits) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_cuda_left_padded_batch_equals_single_prompts(make_tiny, images):
    model, processor = wings_on(make_tiny, CUDA, torch.float32)
    prompts = [PROMPT.format("<image>\n"), PROMPT.format("tell me, please, "), PROMPT.format("<image> then <image>\n")]
    per_sample = [[images[0]], [], [images[1], images[2]]]
    batch = on(processor(text=prompts, images=per_sample, padding_side="left"), CUDA)
    assert batch["attention_mask"].min() == 0  # the shorter prompts really are padded
    gen = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "output_logits": True,
           "return_dict_in_generate": True}
    with torch.no_grad():
        out = model.generate(**batch, **gen)
        width = batch["input_ids"].shape[1]
        for i, (prompt, imgs) in enumerate(zip(prompts, per_sample, strict=True)):
            alone = model.generate(**on(processor(text=prompt, images=imgs or None), CUDA), **gen)
            assert out.sequences[i, width:].tolist() == alone.sequences[0, -8:].tolist()
            worst = max((a[i] - b[0]).abs().max().item() for a, b in zip(out.logits, alone.logits, strict=True))
            assert worst < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cached_decoding_matches_recompute(make_tiny, images, dtype):
    model, processor = wings_on(make_tiny, CUDA, dtype)
    batch = on(processor(text=PROMPT.format("<image>\n"), images=images[:1]), CUDA)
    n = 12
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        # Teacher-forced recompute over the generated sequence, no cache: the logits each cached step produced.
        mask = torch.ones_like(out.sequences)
        full = model(input_ids=out.sequences, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
    width = batch["input_ids"].shape[1]
    recomputed = full[0, width - 1:-1]
    cached = torch.stack(out.logits, dim=1)[0]
    assert rel_err(cached, recomputed) < (1e-4 if dtype == torch.float32 else 3e-2)


def test_cuda_bf16_training_stages_then_chat(make_tiny, tmp_path):
    """Stage 1 -> stage 2 through the Trainer recipe in bf16 mixed precision on the GPU, then chat with the result."""
    from transformers import AutoModelForImageTextToText

    from test_training_stages import CONFIGS, assert_only_groups_changed, params, write_records
    from wings.cli import main as wings_main
    from wings.training import load_config, train
    from wings.training.stages import load_stage_model

    model, processor = make_tiny()
    source = save(model, processor, tmp_path / "init")
    data = write_records(tmp_path / "train.json", n_image=64)
    common = ["train.precision=bf16", "train.report_to=[]", "train.logging_steps=1", "train.warmup_ratio=0",
              "data.max_length=128", "train.batch_size=8", "train.save_steps=1000", "train.max_steps=24",
              "groups.projector.lr=1e-2", "groups.visual_learner.lr=1e-2"]
    stage2 = ["train.gradient_checkpointing=true", "groups.llm.lr=1e-4", "groups.textual_learner.lr=1e-2",
              "groups.router.lr=1e-3"]
    for stage, extra in (("wings_stage1", []), ("wings_stage2", stage2)):
        cfg = load_config(CONFIGS / f"{stage}.yaml", [f"model.path={source}", f"data.path={data}",
                                                      f"output_dir={tmp_path / stage}", *common, *extra])
        torch.manual_seed(cfg.train.seed)  # the same fresh learners / router that train() starts from
        before = params(load_stage_model(cfg))
        result = train(cfg)
        losses = result.losses
        assert all(torch.isfinite(torch.tensor(losses))), losses
        assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, f"{stage} loss did not fall on the GPU: {losses}"
        assert_only_groups_changed(before, params(AutoModelForImageTextToText.from_pretrained(result.final_dir)),
                                   set(result.trainable))
        source = result.final_dir
    image = easy_vqa.get_test_image_paths()[0]
    code = wings_main(["chat", str(source), "What shape is in the image?", "--image", image,
                       "--device", "cuda", "--dtype", "bfloat16", "--max-new-tokens", "6", "--no-stream"])
    assert code in (0, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_router_and_down_projections_equal_reference(make_tiny, dtype):
    """Value channels in the GPU's fused SDPA kernels (head size padded), fused down-projections and the grouped
    learner attention == reference, forward and backward."""
    from test_model_fused import assert_same, padded_batch, run

    model, processor = wings_on(make_tiny, CUDA, dtype)
    model.train()
    batch = on(padded_batch(processor), CUDA)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    fused = run(model, batch, fused_router=True, fused_lowrank=True, grouped_learners=True)
    assert_same(fused, run(model, batch, fused_router=False, fused_lowrank=False, grouped_learners=False), tol)
    for policy in (True, "projections"):  # the GPU kernels' extra outputs (rng state, lengths) kept by the policy
        assert_same(run(model, batch, learner_recompute=policy), fused, tol)


def test_cuda_compiled_static_decoding_equals_dynamic(make_tiny, images):
    """generate compiles the decoding step itself on a GPU with a static cache (inductor)."""
    model, processor = wings_on(make_tiny, CUDA, torch.float32)
    prompts = [PROMPT.format("<image>\n"), PROMPT.format("tell me, please, ")]
    batch = on(processor(text=prompts, images=[[images[0]], []], padding_side="left"), CUDA)
    gen = {"max_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        dynamic = model.generate(**batch, **gen)
        static = model.generate(**batch, cache_implementation="static", **gen)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert max(rel_err(a, b) for a, b in zip(static.logits, dynamic.logits, strict=True)) < 1e-4
