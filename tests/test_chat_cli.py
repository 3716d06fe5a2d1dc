"""`wings chat`: one-shot answers end to end on a saved tiny model, the REPL, and one-line errors."""

from __future__ import annotations

import io

import easy_vqa
import pytest
import torch
from PIL import Image

from wings.cli import main

QUESTION = "what shape is in the image?"


@pytest.fixture(scope="module")
def image_path():
    return easy_vqa.get_test_image_paths()[0]


def reference_reply(model_dir, image_path, max_new_tokens):
    from wings.generation import load_chat_model

    model, processor = load_chat_model(model_dir, device="cpu", dtype="float32")
    prompt = processor.apply_chat_template([{"role": "user", "content": f"<image>\n{QUESTION}"}],
                                           add_generation_prompt=True, tokenize=False)
    batch = processor(text=prompt, images=[Image.open(image_path)])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("stream", [True, False])
def test_one_shot_answer_on_stdout(tiny_model_dir, image_path, capsys, stream):
    args = ["chat", str(tiny_model_dir), "--image", image_path, QUESTION, "--max-new-tokens", "7", "--device", "cpu"]
    assert main(args + ([] if stream else ["--no-stream"])) == 0
    out = capsys.readouterr().out
    assert out == reference_reply(tiny_model_dir, image_path, 7) + "\n"


def test_repl_commands(tiny_model_dir, image_path, monkeypatch, capsys):
    lines = iter([f"/image {image_path}", QUESTION, "/image /no/such.png", "/reset", "/bogus", "hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(tiny_model_dir), "--max-new-tokens", "3", "--no-stream"]) == 0
    captured = capsys.readouterr()
    assert next(lines, None) is None  # every line was read, /exit last
    assert captured.out.count("\n") >= 2  # two answers (a reply may itself hold newlines)
    assert "/no/such.png: does not exist" in captured.err and "history cleared" in captured.err
    assert "unknown command /bogus" in captured.err


def test_repl_ends_on_eof(tiny_model_dir, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", str(tiny_model_dir)]) == 0


@pytest.mark.parametrize("case", ["missing_dir", "not_image", "too_long", "sampling_without_sample"])
def test_errors_are_one_line_exit_2(tiny_model_dir, tmp_path, capsys, case):
    args = {
        "missing_dir": ["chat", str(tmp_path / "nowhere"), "hi"],
        "not_image": ["chat", str(tiny_model_dir), "--image", str(tmp_path / "x.jpg"), "hi"],
        "too_long": ["chat", str(tiny_model_dir), "word " * 1100],
        "sampling_without_sample": ["chat", str(tiny_model_dir), "--temperature", "0.5", "hi"],
    }[case]
    if case == "not_image":
        (tmp_path / "x.jpg").write_bytes(b"\x00garbage")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wings chat: error:") and "\n" not in err
    expected = {"missing_dir": "does not exist", "not_image": "x.jpg", "too_long": "context",
                "sampling_without_sample": "--do-sample"}[case]
    assert expected in err
