"""Hostile input to `wings chat`: flags, images (bombs, folders, garbage) on the command line and through the
interactive `/image`, odd terminal input, Ctrl-C. A bad flag or file is one error line; a bad turn in the REPL
prints an error and the conversation goes on."""

from __future__ import annotations

import pytest

from hostile_support import assert_ok, assert_refused, header_bomb_png, image_path, strip_png, wings

QUESTION = "what shape is in the image?"


def chat(model, *args):
    return ["chat", model, "--device", "cpu", "--max-new-tokens", "3", *args]


def _file(path, data: bytes):
    path.write_bytes(data)
    return path


# (id, argv builder (tmp, model) -> argv, needles)
CASES = [
    ("image_strip_bomb", lambda t, m: chat(m, "--image", strip_png(t / "s.png"), QUESTION), ["s.png", "aspect ratio"]),
    ("image_header_bomb", lambda t, m: chat(m, "--image", header_bomb_png(t / "b.png"), QUESTION),
     ["b.png", "too many pixels"]),
    ("image_a_directory", lambda t, m: chat(m, "--image", t, QUESTION), ["is not a file"]),
    ("image_missing", lambda t, m: chat(m, "--image", t / "no.png", QUESTION), ["no.png", "does not exist"]),
    ("image_empty_file", lambda t, m: chat(m, "--image", _file(t / "e.png", b""), QUESTION),
     ["e.png", "cannot be decoded"]),
    ("image_text_file", lambda t, m: chat(m, "--image", _file(t / "t.png", b"hello"), QUESTION),
     ["t.png", "cannot be decoded"]),
    ("more_placeholders_than_images", lambda t, m: chat(m, "--image", image_path(0), "<image> <image> two?"),
     ["2 `<image>` placeholders but 1 images"]),
    ("prompt_beyond_context", lambda t, m: chat(m, "word " * 1100), ["context"]),
    ("system_beyond_context", lambda t, m: chat(m, "--system", "word " * 1100, "hi"), ["context"]),
    ("stop_empty", lambda t, m: chat(m, "--stop", "", "hi"), ["--stop"]),
    ("max_new_tokens_zero", lambda t, m: chat(m, "--max-new-tokens", "0", "hi"), ["--max-new-tokens", "positive"]),
    ("temperature_zero", lambda t, m: chat(m, "--do-sample", "--temperature", "0", "hi"), ["--temperature", "> 0"]),
    ("temperature_nan", lambda t, m: chat(m, "--do-sample", "--temperature", "nan", "hi"), ["--temperature", "finite"]),
    ("top_p_above_one", lambda t, m: chat(m, "--do-sample", "--top-p", "1.5", "hi"), ["--top-p"]),
    ("top_k_zero", lambda t, m: chat(m, "--do-sample", "--top-k", "0", "hi"), ["--top-k"]),
    ("repetition_penalty_negative", lambda t, m: chat(m, "--repetition-penalty", "-1", "hi"),
     ["--repetition-penalty"]),
    ("sampling_flag_without_sampling", lambda t, m: chat(m, "--top-k", "5", "hi"), ["--do-sample"]),
    ("device_bogus", lambda t, m: chat(m, "--device", "gpu", "hi"), ["--device", "'gpu'"]),
    ("dtype_bogus", lambda t, m: chat(m, "--dtype", "int4", "hi"), ["--dtype"]),
]


@pytest.mark.parametrize(("build", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_chat_refuses_clearly(tmp_path, capsys, tiny_model_dir, build, needles):
    assert_refused(wings(capsys, *build(tmp_path, tiny_model_dir)), "chat", *needles)


def test_a_cuda_device_on_a_cpu_machine_is_refused(capsys, monkeypatch, tiny_model_dir):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_refused(wings(capsys, *chat(tiny_model_dir, "--device", "cuda:1", "hi")), "chat", "no CUDA device")


@pytest.mark.parametrize("stream", [True, False])
def test_stop_strings_work_streamed_and_whole(capsys, tiny_model_dir, stream):
    """`--stop` in the default streaming mode used to raise a TypeError inside stream_generate."""
    args = chat(tiny_model_dir, "--image", image_path(0), "--stop", "zzz", "--max-new-tokens", "4", QUESTION)
    outcome = assert_ok(wings(capsys, *args, *([] if stream else ["--no-stream"])))
    assert outcome.out.endswith("\n")


def repl(monkeypatch, capsys, model, lines):
    feed = iter(lines)

    def fake_input(prompt=""):
        line = next(feed)
        if isinstance(line, BaseException):
            raise line
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    outcome = wings(capsys, *chat(model, "--no-stream"))
    assert next(feed, None) is None  # every line was read
    return outcome


@pytest.mark.parametrize(("bad_turn", "needle"), [
    ("strip_bomb", "aspect ratio"),
    ("header_bomb", "pixels"),
    ("directory", "is not a file"),
    ("placeholder_mismatch", "placeholders"),
    ("not_utf8", "not valid utf-8 text"),
    ("too_long", "context"),
])
def test_a_bad_turn_does_not_end_the_conversation(tmp_path, capsys, monkeypatch, tiny_model_dir, bad_turn, needle):
    turns = {
        "strip_bomb": [f"/image {strip_png(tmp_path / 's.png')}"],
        "header_bomb": [f"/image {header_bomb_png(tmp_path / 'b.png')}"],
        "directory": [f"/image {tmp_path}"],
        "placeholder_mismatch": ["<image> <image> two images?"],
        "not_utf8": [UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")],
        "too_long": ["word " * 1100],
    }[bad_turn]
    outcome = repl(monkeypatch, capsys, tiny_model_dir, [*turns, f"/image {image_path(0)}", QUESTION, "/exit"])
    assert_ok(outcome)
    err = " ".join(outcome.err.split())  # rich wraps long lines
    assert needle in err and "error:" in err and "attached" in err
    assert outcome.out.count("\n") >= 1  # the good turn after the bad one was answered (the reply, then a newline)


def test_ctrl_c_at_the_prompt_ends_cleanly(capsys, monkeypatch, tiny_model_dir):
    outcome = repl(monkeypatch, capsys, tiny_model_dir, [KeyboardInterrupt()])
    assert outcome.rc == 130 and "wings chat: interrupted" in outcome.err and "Traceback" not in outcome.err
