"""Streaming and multi-turn chat sessions."""

from __future__ import annotations

import easy_vqa
import pytest
import torch

from wings.generation import ChatSession, stream_generate


@pytest.fixture(scope="module")
def chat_model(make_tiny):
    from conftest import randomize_wings_

    model, processor = make_tiny(seed=2)
    return randomize_wings_(model, std=0.3, seed=2).eval(), processor


@pytest.fixture(scope="module")
def image_path():
    return easy_vqa.get_test_image_paths()[0]


def test_streamed_text_equals_whole_text(chat_model):
    model, processor = chat_model
    batch = processor(text="<|im_start|>user\nwhat colour is it?<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        whole = model.generate(**batch, max_new_tokens=15, do_sample=False)
    expected = processor.decode(whole[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    pieces = list(stream_generate(model, processor.tokenizer, batch, max_new_tokens=15, do_sample=False))
    assert len(pieces) > 1 and "".join(pieces) == expected


def test_stream_reraises_generation_errors(chat_model):
    model, processor = chat_model
    batch = processor(text="<|im_start|>user\nhi<|im_end|>\n")
    with pytest.raises(ValueError):
        list(stream_generate(model, processor.tokenizer, batch, max_new_tokens=2, num_beams=-1))


def test_multi_turn_history_and_reset(chat_model, image_path):
    model, processor = chat_model
    session = ChatSession(model, processor, generation={"max_new_tokens": 6, "do_sample": False})
    session.attach(image_path)
    first = session.ask("what shape is this?")
    streamed = "".join(session.ask_stream("and its colour?"))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[0]["content"].startswith("<image>\n") and len(session.images) == 1
    assert session.messages[1]["content"] == first and session.messages[3]["content"] == streamed
    # The second turn saw the first (history + its image): same reply as asking with the whole history at once.
    fresh = ChatSession(model, processor, generation={"max_new_tokens": 6, "do_sample": False})
    fresh.messages = [dict(m) for m in session.messages[:2]]
    fresh.images = list(session.images)
    assert fresh.ask("and its colour?") == streamed
    session.reset()
    assert session.messages == [] and session.images == []


def test_prompt_longer_than_context_is_refused(chat_model):
    model, processor = chat_model
    session = ChatSession(model, processor)
    limit = session.context_length
    with pytest.raises(ValueError, match="context"):
        session.ask("word " * (limit + 10))


def test_bad_images_are_refused(chat_model, tmp_path):
    model, processor = chat_model
    session = ChatSession(model, processor)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        session.attach(not_image)
    with pytest.raises(ValueError, match="missing.png: does not exist"):
        session.attach(tmp_path / "missing.png")
