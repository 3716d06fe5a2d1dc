"""torch.compile and the static (pre-allocated) learner cache.

The compile tests use the `aot_eager` backend: it traces forward and backward exactly as inductor does (so graph
breaks and tracing errors show) without spending a minute in a C++ compiler; benchmarks/ time inductor itself.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import easy_vqa
import pytest
import torch
from PIL import Image
from transformers import CompileConfig, StaticCache

from conftest import randomize_wings_

QUESTION = "<|im_start|>user\n{}what shape is in the image?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def wings_model(make_tiny):
    model, processor = make_tiny(seed=1)
    randomize_wings_(model, std=0.3, seed=1)
    return model.eval(), processor


@pytest.fixture(scope="module")
def padded_prompts(wings_model):
    _, processor = wings_model
    paths = easy_vqa.get_test_image_paths()
    images = [Image.open(paths[i]).convert("RGB") for i in range(3)]
    prompts = [QUESTION.format("<image>\n"), QUESTION.format("tell me, please, "),
               QUESTION.format("<image> then <image>\n")]
    return processor(text=prompts, images=[[images[0]], [], images[1:]], padding_side="left")


def greedy(model, batch, **kw):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=8, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


def assert_same_generation(a, b, tol=1e-5):
    assert torch.equal(a.sequences, b.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True)) < tol


def test_static_cache_generates_what_the_dynamic_cache_does(wings_model, padded_prompts):
    model, processor = wings_model
    dynamic = greedy(model, padded_prompts)
    static = greedy(model, padded_prompts, cache_implementation="static", disable_compile=True)
    assert_same_generation(static, dynamic)
    single = {k: v[2:] for k, v in padded_prompts.items() if k != "pixel_values"}  # unpadded: generate drops the mask
    single["pixel_values"] = padded_prompts["pixel_values"][1:]
    assert_same_generation(greedy(model, single, cache_implementation="static", disable_compile=True),
                           greedy(model, single))
    # the learners matter in this batch: switching them off moves the logits by far more than the tolerance
    plain = copy.deepcopy(model)
    plain.wings_kernels.fused_router = False
    for m in (plain.language_model.model.layers[i].self_attn for i in range(2)):
        m.visual = m.textual = None
    assert max((x - y).abs().max().item() for x, y in zip(greedy(plain, padded_prompts).logits, dynamic.logits,
                                                              strict=False)) > 1e-2


def test_compiled_static_decoding_is_one_graph_and_equals_dynamic(wings_model, padded_prompts):
    """`fullgraph=True` makes any graph break in the decoding step (Wings parts included) an error."""
    model, _ = wings_model
    config = CompileConfig(fullgraph=True, mode="default", backend="aot_eager")
    config._compile_all_devices = True  # generate compiles the decoding step itself only on accelerators
    torch._dynamo.reset()
    compiled = greedy(model, padded_prompts, cache_implementation="static", compile_config=config)
    assert_same_generation(compiled, greedy(model, padded_prompts))


class GraphBreaks(logging.Handler):
    """Collects dynamo's graph-break log records (what TORCH_LOGS=graph_breaks prints)."""

    LOGGERS = ("torch._dynamo.exc.__graph_breaks", "torch._dynamo.symbolic_convert.__graph_breaks",
               "torch._dynamo.convert_frame.__graph_breaks")

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"in user code at (\S+?):\d+", record.getMessage())
        self.where.append(Path(found.group(1)).name if found else "?")

    def __enter__(self):
        torch._logging.set_logs(graph_breaks=True)
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)
        torch._logging.set_logs()


def test_compiled_training_forward_and_backward_match_eager(wings_model, padded_prompts):
    """No graph break inside the Wings layer parts (the only one is the per-forward token count before the
    decoder), and the compiled step gives the eager logits and gradients."""
    model, _ = wings_model
    model = copy.deepcopy(model).train()
    batch = {**padded_prompts, "labels": padded_prompts["input_ids"]}

    def step(call):
        model.zero_grad(set_to_none=True)
        out = call(**batch)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_logits, eager_grads = step(model)  # also lets HF install its output hooks before tracing
    torch._dynamo.reset()
    with GraphBreaks() as breaks:
        compiled_logits, compiled_grads = step(torch.compile(model, backend="aot_eager"))
    assert breaks.where and set(breaks.where) == {"state.py"}, breaks.where  # the token-count sync only
    real = batch["attention_mask"].bool()
    assert (compiled_logits[real] - eager_logits[real]).abs().max() < 1e-5
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert (compiled_grads[name] - grad).abs().max() <= 1e-5 * max(1.0, grad.abs().max().item()), name


def test_static_learner_cache_follows_beam_reordering(wings_model, padded_prompts):
    model, _ = wings_model
    kw = dict(num_beams=2, length_penalty=0.0)
    static = greedy(model, padded_prompts, cache_implementation="static", disable_compile=True,
                    output_scores=True, **kw)
    dynamic = greedy(model, padded_prompts, output_scores=True, **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert (static.sequences_scores - dynamic.sequences_scores).abs().max() < 1e-5


def test_reset_static_cache_generates_as_a_fresh_one(wings_model, padded_prompts):
    """HF's way to reuse a static cache (one compiled step for many requests): `cache.reset()` between calls. The
    learner cache riding on it is cleared too, so the second call generates what a fresh cache does."""
    model, _ = wings_model
    length = padded_prompts["input_ids"].shape[1] + 8

    def fresh() -> StaticCache:
        return StaticCache(config=model.config.text_config, max_cache_len=length)

    reference = greedy(model, padded_prompts, cache=fresh(), disable_compile=True)
    cache = fresh()
    other = {k: v.flip(0) if k != "pixel_values" else v for k, v in padded_prompts.items()}  # a different request
    other["pixel_values"] = torch.cat([padded_prompts["pixel_values"][1:], padded_prompts["pixel_values"][:1]])
    greedy(model, other, cache=cache, disable_compile=True)
    cache.reset()
    assert_same_generation(greedy(model, padded_prompts, cache=cache, disable_compile=True), reference)
