"""LLaVA records through a stock VLM's own chat template and processor: labels on replies only, every image
expanded as the family expands it, batches the model takes, and the bad-record reasons of this pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_support import tiny
from wings.data import build_dataset
from wings.data.records import normalize
from wings.data.report import BadRecord
from wings.model_kinds import data_pipeline

FAMILIES = ["llava", "llava_next", "qwen2_vl", "smolvlm", "internvl"]


def easyvqa_paths(n: int) -> list[str]:
    import easy_vqa

    paths = easy_vqa.get_train_image_paths()
    return [paths[i] for i in range(n)]


def record(images: list[str], turns: list[tuple[str, str]], rid: str = "r") -> dict:
    conversations = []
    for human, gpt in turns:
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return {"id": rid, "images": images, "conversations": conversations}


@pytest.mark.parametrize("kind", FAMILIES)
def test_labels_are_the_replies_and_images_expand_as_the_processor_does(kind, tmp_path):
    model, processor = tiny(kind)
    formatter, collate = data_pipeline(model, processor, max_length=512)
    a, b = easyvqa_paths(2)
    raw = record([a, b], [("<image>\nwhat shape is it?", "circle"), ("and here? <image>", "a red triangle")])
    sample = formatter.sample(normalize(raw, "r", tmp_path))
    labels = sample["labels"][sample["labels"] != -100].tolist()
    tok = processor.tokenizer
    assert tok.decode(labels) == "circle<|im_end|>a red triangle<|im_end|>"  # replies and their end of turn
    image_id = torch.tensor([model.config.image_token_id])
    visual = torch.isin(sample["input_ids"], image_id)
    assert not (visual & (sample["labels"] != -100)).any()
    # the same images in one prompt through the processor expand to as many image tokens
    from PIL import Image

    pil = [Image.open(p).convert("RGB") for p in (a, b)]
    two_images = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
    text = processor.tokenizer.apply_chat_template(two_images, chat_template=processor.chat_template, tokenize=False)
    direct = processor(text=[text], images=[pil], return_tensors="pt")["input_ids"][0]
    assert int(visual.sum()) == int(torch.isin(direct, image_id).sum()) > 0
    # a batch of this sample and a text-only one: the stock model takes it and gives a finite loss
    text_only = formatter.sample(normalize(record([], [("what is 2 + 2?", "4")]), "t", tmp_path))
    batch = collate([sample, text_only])
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_bad_records_of_the_vlm_pipeline(tmp_path):
    model, processor = tiny("qwen2_vl")
    (a,) = easyvqa_paths(1)
    good = record([a], [("<image>\nwhat is it?", "circle")], "good")
    formatter, _ = data_pipeline(model, processor, max_length=4096)
    n = len(formatter.encode(normalize(good, "good", tmp_path)).input_ids)
    records = [good,
               record([a], [("what is it?", "it is <image>")], "reply_image"),
               record([a], [("long " * 60 + "<image>", "circle")], "cut_image"),
               record([a], [("<image>" + " long" * 60, "circle")], "nothing_left")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    formatter, _ = data_pipeline(model, processor, max_length=n + 2)
    ds = build_dataset(data, processor, max_length=n + 2, formatter=formatter, report_path=tmp_path / "report.json",
                       progress=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(ds) == 1
    assert report["skipped_by_reason"] == {"image_in_reply": 1, "truncated_image": 1, "over_long": 1}

    processor.chat_template = processor.chat_template.replace(  # a template that marks the last message
        "{{- '<|im_end|>\\n' -}}", "{%- if loop.last -%}{{- '<|im_end|><end>' -}}{%- else -%}"
        "{{- '<|im_end|>\\n' -}}{%- endif -%}")
    with pytest.raises(BadRecord, match="template_mismatch"):
        formatter.sample(normalize(good, "good", tmp_path))
