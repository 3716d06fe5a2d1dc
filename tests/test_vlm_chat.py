"""`wings chat` on stock VLMs with Wings attached: images in a multi-turn history, the same tokens as generate."""

from __future__ import annotations

import pytest
import torch

from vlm_support import easyvqa_images, init_wings_dir, render
from wings.cli import main as wings_main
from wings.generation import ChatSession, load_chat_model


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "smolvlm"])
def test_chat_turns_with_images(kind, tmp_path):
    model, processor = load_chat_model(init_wings_dir(kind, tmp_path / "m", stage=2), device="cpu")
    session = ChatSession(model, processor, generation={"max_new_tokens": 4, "do_sample": False})
    image = easyvqa_images(1)[0]
    session.pending.append(image)
    first = session.ask("what color is the shape?")
    # the first reply is what generate gives for the same prompt, built with the processor directly
    text = render(processor, [{"type": "image"}, {"type": "text", "text": "\nwhat color is the shape?"}])
    direct = dict(processor(text=[text], images=[[image]], return_tensors="pt"))
    with torch.no_grad():
        out = model.generate(**direct, max_new_tokens=4, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    assert first == processor.tokenizer.decode(out[0, direct["input_ids"].shape[1]:], skip_special_tokens=True)
    session.pending.append(easyvqa_images(2)[1])
    session.ask("and this one?")
    inputs, _ = session.prepare("thanks")
    ids = inputs["input_ids"][0]
    visual = sum(int((ids == i).sum()) for i in model._wings_visual_ids)
    per_image = sum(int((direct["input_ids"][0] == i).sum()) for i in model._wings_visual_ids)
    assert visual == 2 * per_image  # both images stay in the history


def test_chat_cli_one_answer(tmp_path, capsys):
    model_dir = init_wings_dir("qwen2_vl", tmp_path / "m", stage=2)
    image = tmp_path / "shape.png"
    easyvqa_images(1)[0].save(image)
    assert wings_main(["chat", str(model_dir), "--image", str(image), "--max-new-tokens", "3", "--device", "cpu",
                       "what color is it?"]) == 0
    assert "error" not in capsys.readouterr().err
