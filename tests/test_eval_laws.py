"""MLLM-LAWS: the hook-based per-layer segment masses equal a straightforward computation from materialised eager
attentions, padding and batching change nothing, and the attention shift is 1 - mean Pearson(before, after)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randomize_wings_
from test_eval_common import vqa_records, write_jsonl
from wings.builder import TinySpec
from wings.cli import main
from wings.evaluation.laws import compute_laws, main_attention_modules
from wings.evaluation.models import EvalModel
from wings.evaluation.tasks import load_task


@pytest.fixture(scope="module", params=["wings"])
def deep_model(request, make_tiny):
    """4 layers, so Pearson's r over layers is not trivially +-1 (randomised learners and router in wings mode)."""
    model, processor = make_tiny(spec=TinySpec(layers=4), seed=5, mode=request.param)
    randomize_wings_(model, std=0.3, seed=2)
    return EvalModel(model.eval(), processor.tokenizer, processor, processor.chat_template, request.param, Path("."))


@pytest.fixture(scope="module")
def laws_task(tmp_path_factory):
    records = vqa_records(4)
    records[1]["question"] = "look at this picture carefully, please. " + records[1]["question"]  # uneven lengths
    records[2]["context"] = [{"question": "hello there", "answer": "hi"}]
    return load_task(write_jsonl(tmp_path_factory.mktemp("laws") / "laws.jsonl", records))


def reference_laws(em: EvalModel, task, queries: str) -> list[dict]:
    """One item at a time, no padding, all layers' attentions materialised by output_attentions."""
    model = em.model
    model.set_attn_implementation("eager")
    out = []
    for item in task.items:
        prompt = em.encode_item(item)[0]
        ids = torch.tensor([prompt.ids])
        with torch.no_grad():
            attns = model(input_ids=ids, pixel_values=prompt.pixel_values, use_cache=False,
                          output_attentions=True).attentions
        assert len(attns) == model.config.text_config.num_hidden_layers
        img = [k for k, t in enumerate(prompt.ids) if t == model.config.image_token_id]
        first, last = img[0], img[-1]
        T = len(prompt.ids)
        keys = {"text_before": list(range(first)), "image": img, "text_after": list(range(last + 1, T))}
        rows = list(range(T)) if queries == "all" else keys["text_after"]
        laws = {name: [] for name in keys}
        for a in attns:
            probs = a[0].mean(0).numpy()  # [T, S], heads averaged
            for name, cols in keys.items():
                laws[name].append(float(probs[np.ix_(rows, cols)].sum(1).mean()))
        out.append(laws)
    model.set_attn_implementation("sdpa")
    return out


@pytest.mark.parametrize(("deep_model", "queries"), [("wings", "all"), ("wings", "after"), ("llava", "all")],
                         indirect=["deep_model"])
def test_hooked_laws_equal_materialised_attentions(deep_model, laws_task, queries):
    result = compute_laws(deep_model, laws_task, queries=queries, batch_size=3, progress=False)
    reference = reference_laws(deep_model, laws_task, queries)
    assert result["n_items"] == 4 and result["n_layers"] == 4
    rs = []
    for got, ref in zip(result["items"], reference, strict=True):
        for name in ("text_before", "image", "text_after"):
            np.testing.assert_allclose(got["laws"][name], ref[name], atol=2e-5)
        r = np.corrcoef(ref["text_before"], ref["text_after"])[0, 1]
        assert got["pearson"] == pytest.approx(r, abs=1e-4)
        rs.append(r)
        if queries == "all":  # one image: every query's mass is split among the three segments
            np.testing.assert_allclose(np.sum([got["laws"][n] for n in got["laws"]], axis=0), 1.0, atol=1e-5)
    assert result["attention_shift"] == pytest.approx(1 - np.mean(rs), abs=1e-4)
    assert 0.0 <= result["attention_shift"] <= 2.0
    # the model is left as it was: sdpa, no hooks, no weights returned
    assert deep_model.model.config.text_config._attn_implementation == "sdpa"
    for m in main_attention_modules(deep_model.model.language_model):
        assert not any(getattr(h, "__self__", None).__class__.__name__ == "LawsRecorder"
                       for h in m._forward_hooks.values())


def test_one_layer_at_a_time(deep_model, laws_task, monkeypatch):
    """Each layer's weights are reduced inside its own hook and released before the next layer runs."""
    import weakref

    from wings.evaluation import laws as laws_mod

    alive = []
    original = laws_mod.LawsRecorder._hook

    def spy(self, module, args, output):
        alive.append([w for w in refs if w() is not None])
        refs.append(weakref.ref(output[1]))
        return original(self, module, args, output)

    refs: list = []
    monkeypatch.setattr(laws_mod.LawsRecorder, "_hook", spy)
    compute_laws(deep_model, laws_task, batch_size=4, progress=False)
    assert len(alive) == 4 and all(not a for a in alive)


def test_cli_writes_json_and_png(tiny_model_dir, laws_task, tmp_path, capsys):
    out = tmp_path / "laws"
    assert main(["laws", str(tiny_model_dir), "--data", str(laws_task.path), "--out", str(out),
                 "--max-items", "2"]) == 0
    data = json.loads((out / "laws.json").read_text())
    assert data["n_items"] == 2 and set(data["laws_mean"]) == {"text_before", "image", "text_after"}
    assert data["settings"]["heads"] == "mean"
    assert (out / "laws.png").read_bytes()[:4] == b"\x89PNG"
    assert "attention shift" in capsys.readouterr().out


def test_needs_images(deep_model, tmp_path):
    task = load_task(write_jsonl(tmp_path / "t.jsonl", [{"id": "txt", "question": "q", "answer": "x"}]))
    with pytest.raises(ValueError, match="record 'txt' has no image"):
        compute_laws(deep_model, task, progress=False)


def test_multi_image_uses_first_span(deep_model, tmp_path):
    two = vqa_records(2)
    rec = {"id": "two", "question": "<image> and <image>: same shape?", "answer": "no",
           "images": [two[0]["image"], two[1]["image"]]}
    task = load_task(write_jsonl(tmp_path / "two.jsonl", [rec]))
    laws = compute_laws(deep_model, task, progress=False)["items"][0]["laws"]
    total = np.sum([laws[n] for n in laws], axis=0)
    assert np.all(total < 1 - 1e-3)  # the second image's tokens belong to no segment
