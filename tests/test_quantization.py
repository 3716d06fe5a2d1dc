"""Quantized weights (`--quantize int8|nf4`, wings.quantization): both kinds of model load with the LLM's linear
layers quantized and every Wings part, the projector, the vision tower and the LM head as they were; they answer
through `wings chat` and `wings serve`; what cannot run is refused in one line."""

from __future__ import annotations

import argparse

import pytest
import torch

from conftest import randomize_wings_
from vlm_support import easyvqa_images
from wings.cli import main as wings_main
from wings.generation import ChatSession, load_chat_model
from wings.model_kinds import load_model, load_processor
from wings.prompting import codec_for
from wings.quantization import QuantizationError, backend_available, quantized_modules, with_wings_skips

WINGS_PARTS = (".self_attn.visual.", ".self_attn.textual.", ".self_attn.router.")
# Names kept in the loading dtype, per kind of model: the Wings parts, the vision encoder, the projector, the head.
KEPT = {"composed": ("vision_tower.", "projector."), "qwen2_vl": ("model.visual.",)}
METHODS = ("int8", "nf4")

needs_bnb = pytest.mark.skipif(not backend_available(),
                               reason="bitsandbytes is not installed (the quantize extra: pip install '.[quantize]')")


@pytest.fixture(scope="module")
def model_dirs(make_tiny, tmp_path_factory):
    """A composed Wings model (hidden 64: bitsandbytes' packed NF4 CPU path) and a Qwen2-VL with Wings attached
    (hidden 32: its plain path), both stage 2 with random learner and router weights, so the Wings parts matter."""
    import wings.vlm as vlm
    from wings.builder import save
    from wings.vlm.tiny import build_tiny_vlm

    composed, processor = make_tiny(seed=3)
    composed_dir = save(randomize_wings_(composed, std=0.3, seed=3), processor,
                        tmp_path_factory.mktemp("quant_composed"))
    stock, processor = build_tiny_vlm("qwen2_vl", seed=3)
    vlm.attach(stock, rank=4, stage=2)
    randomize_wings_(stock, std=0.3, seed=3)
    stock_dir = tmp_path_factory.mktemp("quant_qwen2_vl")
    stock.save_pretrained(stock_dir)
    vlm.save_processor(processor, stock_dir)
    return {"composed": composed_dir, "qwen2_vl": stock_dir}


def image_batch(model, model_dir):
    codec = codec_for(model, load_processor(model_dir))
    prompt = codec.encode([{"role": "user", "content": "<image>\nwhat color is the shape?"}], [easyvqa_images(1)[0]])
    batch = codec.batch([prompt], model.device)
    batch.pop("position_ids", None)
    return batch


def kept(name: str, kind: str) -> bool:
    return any(part in f".{name}." for part in WINGS_PARTS) or name.startswith(KEPT[kind]) or \
        name.endswith("lm_head")


@needs_bnb
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["composed", "qwen2_vl"])
def test_quantized_load_keeps_the_wings_parts_and_answers(model_dirs, kind, method):
    path = model_dirs[kind]
    reference = load_model(path).eval()
    model = load_model(path, quantize=method).eval()
    linears = {name for name, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {name for name in linears if not kept(name, kind)}
    # Every other linear layer (the decoder's attention and MLP) is quantized, and nothing else is.
    assert expected and set(quantized_modules(model)) == expected
    wings_params = dict(model.named_parameters())
    checked = 0
    for name, param in reference.named_parameters():
        if kept(name.rsplit(".", 1)[0], kind) and "lm_head" not in name:
            assert wings_params[name].dtype == torch.float32 and torch.equal(wings_params[name], param), name
            checked += any(part in name for part in WINGS_PARTS)
    assert checked > 0
    batch = image_batch(model, path)
    with torch.no_grad():
        logits = model(**batch).logits
        full = reference(**batch).logits
    assert torch.isfinite(logits).all()
    if method == "int8":
        # Relative logit error of LLM.int8 on these models: 0.0014-0.0031 over seeds 0-3, both kinds, 1 and 2 torch
        # threads (0.004-0.06 with every LLM weight random at std 0.3; NF4 loses more on widths of 32-64).
        assert ((logits - full).norm() / full.norm()).item() < 0.02
    # The learners still act on top of the quantized layers: silencing their outputs changes the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("o_proj.up.weight") and any(part in name for part in WINGS_PARTS):
                param.zero_()
        silenced = model(**batch).logits
    assert not torch.allclose(silenced, logits)
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         pad_token_id=load_processor(path).tokenizer.pad_token_id)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


@needs_bnb
def test_a_quantization_config_from_python_gets_the_wings_skips(model_dirs):
    from transformers import BitsAndBytesConfig

    given = BitsAndBytesConfig(load_in_8bit=True)
    model = load_model(model_dirs["composed"], quantization_config=given)
    assert given.llm_int8_skip_modules is None  # the caller's object is left as it was
    assert quantized_modules(model) and not any(kept(name, "composed") for name in quantized_modules(model))
    own = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    assert with_wings_skips(own, "wings").llm_int8_skip_modules == ["lm_head"]  # a list given is used as is


@needs_bnb
def test_wings_chat_quantized(model_dirs, tmp_path, capsys):
    image = tmp_path / "shape.png"
    easyvqa_images(1)[0].save(image)
    path = model_dirs["composed"]
    assert wings_main(["chat", str(path), "--quantize", "nf4", "--device", "cpu", "--image", str(image),
                       "--max-new-tokens", "4", "--no-stream", "what color is the shape?"]) == 0
    printed = capsys.readouterr()
    model, processor = load_chat_model(path, device="cpu", quantize="nf4")
    session = ChatSession(model, processor, generation={"max_new_tokens": 4, "do_sample": False})
    session.attach(image)
    assert printed.out == session.ask("what color is the shape?") + "\n"
    assert printed.err == ""  # bitsandbytes' per-matmul and import-time notices stay quiet


@needs_bnb
def test_wings_serve_quantized(model_dirs, tmp_path):
    pytest.importorskip("fastapi", reason="wings serve needs the serve extra")
    import requests

    from test_serve_common import data_url, running, user
    from wings.cli.serve import load_served

    path = model_dirs["qwen2_vl"]
    args = argparse.Namespace(device="cpu", dtype="auto", quantize="int8")
    served = load_served(args, str(path), "tiny-int8", None)
    assert served.name == "tiny-int8" and quantized_modules(served.model)
    image = easyvqa_images(1)[0]
    file = tmp_path / "shape.png"
    image.save(file)
    model, processor = load_chat_model(path, device="cpu", quantize="int8")
    session = ChatSession(model, processor, generation={"max_new_tokens": 4, "do_sample": False})
    session.attach(file)
    expected = session.ask("what color is the shape?")
    with running([("tiny-int8", (served.model, served.processor))]) as (url, _):
        reply = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "tiny-int8", "max_tokens": 4, "temperature": 0,
            "messages": user("what color is the shape?", data_url(str(file)))})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_refused_without_bitsandbytes(model_dirs, monkeypatch, capsys):
    monkeypatch.setattr("wings.quantization.backend_available", lambda: False)
    with pytest.raises(QuantizationError) as err:
        load_chat_model(model_dirs["composed"], device="cpu", quantize="int8")
    assert "bitsandbytes, which is not installed" in one_line(err.value)
    assert "pip install 'wings-mllm[quantize]'" in str(err.value)
    assert wings_main(["chat", str(model_dirs["qwen2_vl"]), "--quantize", "nf4", "--device", "cpu", "hi"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nf4 weights need bitsandbytes" in lines[0]


@needs_bnb
@pytest.mark.parametrize("method,device", [("int8", "mps"), ("nf4", "hpu"), ("int8", "hpu")])
def test_refused_where_bitsandbytes_has_no_kernel(model_dirs, method, device):
    # Checked from the config and the device name before any weight is read, so no such device is needed here.
    with pytest.raises(QuantizationError) as err:
        load_model(model_dirs["composed"], quantize=method, device_map={"": device})
    assert f"bitsandbytes has no {method} kernels for device {device!r}" in one_line(err.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"quantize": "int4"}, "--quantize must be one of int8, nf4, got 'int4'"),
    ({"quantize": "int8", "quantization_config": object()}, "either quantize or quantization_config"),
    ({"quantize": "int8", "device_map": {"a": "cpu", "b": "cuda"}}, "a quantized load takes one device"),
])
def test_refused_combinations(model_dirs, kwargs, message):
    with pytest.raises(QuantizationError) as err:
        load_model(model_dirs["composed"], **kwargs)
    assert message in one_line(err.value)


def test_refused_fresh_learners_on_a_quantized_stock_model(tmp_path):
    from wings.vlm.tiny import save_tiny_vlm

    path = save_tiny_vlm("llava", tmp_path / "stock")
    with pytest.raises(QuantizationError) as err:
        load_model(path, quantize="int8", overrides={"mode": "wings"})
    assert "wings init-model --vlm" in one_line(err.value)


def test_cli_offers_int8_and_nf4_only(model_dirs, capsys):
    with pytest.raises(SystemExit) as stop:
        wings_main(["serve", str(model_dirs["composed"]), "--quantize", "int4"])
    assert stop.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
