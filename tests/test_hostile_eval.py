"""Hostile input to the scoring commands: eval, forgetting, iit build, laws. Items that cannot discriminate or
whose gold answer is ambiguous are refused by id (never scored); images are checked when the task loads; outputs
never land on an input; a full disk leaves no half-written results."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from hostile_support import (
    assert_ok,
    assert_refused,
    assert_refused_untouched,
    copy_dir,
    header_bomb_png,
    hidden_leftovers,
    image_path,
    latin1,
    plain_llm_dir,
    strip_png,
    truncate,
    wings,
    write_jsonl,
)

OK = {"id": "ok", "question": "What is 1 + 1?", "options": ["2", "3"], "answer": "2"}


def task(tmp: Path, *records, name: str = "task") -> Path:
    return write_jsonl(tmp / f"{name}.jsonl", [OK, *records])


def _file(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ev(model, *tasks_and_flags):
    return ["eval", model, "--device", "cpu", *tasks_and_flags]  # a later --device wins


# (id, argv builder (tmp, model) -> argv, needles)
EVAL_CASES = [
    ("mc_single_option", lambda t, m: ev(m, "--task", task(t, {"id": "one", "question": "q?", "options": ["yes"],
                                                                 "answer": "yes"})),
     ["'one'", "at least 2 options", "always be scored correct"]),
    ("mc_options_differ_by_case", lambda t, m: ev(m, "--task", task(t, {"id": "case", "question": "q?",
                                                                          "options": ["Paris", "paris "],
                                                                          "answer": 0})),
     ["'case'", "differ only in case or spacing"]),
    ("mc_letter_and_text_disagree", lambda t, m: ev(m, "--task", task(t, {"id": "amb", "question": "q?",
                                                                            "options": ["B", "A"], "answer": "A"})),
     ["'amb'", "ambiguous", "option 1 by its text and option 0 by its letter"]),
    ("mc_answer_bool", lambda t, m: ev(m, "--task", task(t, {"id": "b", "question": "q?", "options": ["x", "y"],
                                                               "answer": True})), ["'b'", "not an option"]),
    ("mc_duplicate_options", lambda t, m: ev(m, "--task", task(t, {"id": "d", "question": "q?",
                                                                     "options": ["x", "x"], "answer": 0})),
     ["'d'", "duplicates"]),
    ("open_answer_only_an_article", lambda t, m: ev(m, "--task", task(t, {"id": "the", "question": "q?",
                                                                            "answer": "The"})),
     ["'the'", "empty once normalised"]),
    ("open_answer_punctuation", lambda t, m: ev(m, "--task", task(t, {"id": "p", "question": "q?", "answer": "?!"})),
     ["'p'", "empty once normalised"]),
    ("open_answer_bool", lambda t, m: ev(m, "--task", task(t, {"id": "tb", "question": "q?", "answer": True})),
     ["'tb'", "non-empty string"]),
    ("duplicate_ids", lambda t, m: ev(m, "--task", task(t, OK)), ["duplicate id"]),
    ("task_missing", lambda t, m: ev(m, "--task", t / "nope.jsonl"), ["task file", "does not exist"]),
    ("task_a_directory", lambda t, m: ev(m, "--task", t), ["task file", "is a directory"]),
    ("task_latin1", lambda t, m: ev(m, "--task", latin1(t / "l.jsonl", '{"id": "caf\u00e9"}\n')),
     ["l.jsonl line 1", "not UTF-8"]),
    ("task_bad_json", lambda t, m: ev(m, "--task", _file(t / "b.jsonl", '{"id": 1,\n')), ["line 1", "not valid JSON"]),
    ("task_deep_nesting", lambda t, m: ev(m, "--task", _file(t / "n.jsonl", "[" * 200_000 + "\n")),
     ["nested too deeply"]),
    ("task_empty", lambda t, m: ev(m, "--task", _file(t / "e.jsonl", "\n\n")), ["no records"]),
    ("two_tasks_same_name", lambda t, m: ev(m, "--task", task(t), "--task", task(t / "sub")), ["both named"]),
    ("image_strip_bomb", lambda t, m: ev(m, "--task", task(t, {"id": "strip", "question": "<image> q?",
                                                                 "answer": "x", "image": str(strip_png(t / "s.png"))})),
     ["'strip'", "aspect ratio"]),
    ("image_header_bomb", lambda t, m: ev(m, "--task", task(t, {"id": "bomb", "question": "<image> q?", "answer": "x",
                                                                  "image": str(header_bomb_png(t / "b.png"))})),
     ["'bomb'", "pixels"]),
    ("image_garbage", lambda t, m: ev(m, "--task", task(t, {"id": "g", "question": "<image> q?", "answer": "x",
                                                              "image": str(_file(t / "g.png", "text"))})),
     ["'g'", "cannot be decoded"]),
    ("image_a_directory", lambda t, m: ev(m, "--task", task(t, {"id": "dir", "question": "<image> q?", "answer": "x",
                                                                  "image": str(t)})), ["'dir'", "unknown image"]),
    ("image_nul_in_path", lambda t, m: ev(m, "--task", task(t, {"id": "nul", "question": "q?", "answer": "x",
                                                                  "image": "a\u0000.png"})), ["'nul'", "path string"]),
    ("out_is_the_task", lambda t, m: ev(m, "--task", task(t), "--out", t / "task.jsonl"), ["is the --task"]),
    ("predictions_over_a_task", lambda t, m: ev(m, "--task", task(t), "--task",
                                                task(t, name="r.task.predictions"), "--out", t / "r.json"),
     ["predictions.jsonl is the --task"]),
    ("out_inside_the_model", lambda t, m: ev(copy_dir(m, t / "m"), "--task", task(t), "--out", t / "m" / "r.json"),
     ["inside the MODEL_DIR"]),
    ("out_a_directory", lambda t, m: ev(m, "--task", task(t), "--out", t), ["--out", "is a directory"]),
    ("out_parent_a_file", lambda t, m: ev(m, "--task", task(t), "--out", _file(t / "f") / "r.json"), ["is a file"]),
    ("batch_size_zero", lambda t, m: ev(m, "--task", task(t), "--batch-size", "0"), ["--batch-size", "positive"]),
    ("max_new_tokens_negative", lambda t, m: ev(m, "--task", task(t), "--max-new-tokens", "-3"),
     ["--max-new-tokens"]),
    ("device_bogus", lambda t, m: ev(m, "--task", task(t), "--device", "tpu9"), ["--device", "tpu9"]),
    ("plain_llm_with_image_tasks", lambda t, m: ev(plain_llm_dir(), "--task", task(t, {
        "id": "v", "question": "<image> q?", "answer": "x", "image": image_path(0)})), ["text-only", "have images"]),
]


@pytest.mark.parametrize(("build", "needles"), [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_eval_refuses_before_scoring(tmp_path, capsys, monkeypatch, tiny_model_dir, build, needles):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_loading)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    args = build(tmp_path, tiny_model_dir)
    assert_refused_untouched(capsys, tmp_path, args, "eval", *needles)


def test_cuda_device_on_a_machine_without_one_is_refused(tmp_path, capsys, monkeypatch, tiny_model_dir):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_refused(wings(capsys, "eval", tiny_model_dir, "--task", task(tmp_path), "--device", "cuda"), "eval",
                   "--device cuda", "no CUDA device")


def test_a_full_disk_leaves_no_half_written_results(tmp_path, capsys, monkeypatch, tiny_model_dir):
    from wings import atomic

    out = tmp_path / "results.json"

    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "_fsync", no_space)
    assert_refused(wings(capsys, *ev(tiny_model_dir, "--task", task(tmp_path), "--out", out)), "eval",
                   "no space left")
    assert not out.exists() and not hidden_leftovers(tmp_path)


def test_a_plain_llm_scores_text_tasks(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert_ok(wings(capsys, *ev(plain_llm_dir(), "--task", task(tmp_path), "--out", out)))
    assert json.loads(out.read_text())["tasks"]["task"]["n"] == 1


# ---------------------------------------------------------------------------------------------------------------
# forgetting


def fg(base, models, tasks, out, *extra):
    args = ["forgetting", "--base", base, "--out", out, "--device", "cpu"]
    for m in models:
        args += ["--model", m]
    for t in tasks:
        args += ["--task", t]
    return [*args, *extra]


FORGETTING_CASES = [
    ("label_count", lambda t, m: fg(plain_llm_dir(), [m], [task(t)], t / "o", "--label", "a", "--label", "b"),
     ["2 --label values for 1 --model"]),
    ("label_with_slash", lambda t, m: fg(plain_llm_dir(), [m], [task(t)], t / "o", "--label", "../x"),
     ["'../x'", "without slashes"]),
    ("same_labels", lambda t, m: fg(plain_llm_dir(), [m], [task(t)], t / "o", "--label", "x", "--base-label", "x"),
     ["labelled x"]),
    ("image_task", lambda t, m: fg(plain_llm_dir(), [m], [task(t, {"id": "v", "question": "<image> q?", "answer": "x",
                                                                     "image": image_path(0)})], t / "o"),
     ["'v'", "has images"]),
    ("out_is_a_file", lambda t, m: fg(plain_llm_dir(), [m], [task(t)], _file(t / "o")), ["is a file"]),
    ("out_is_a_model", lambda t, m: fg(plain_llm_dir(), [copy_dir(m, t / "m")], [task(t)], t / "m"),
     ["is the model directory"]),
    ("results_folder_is_a_model", lambda t, m: fg(plain_llm_dir(), [copy_dir(m, t / "runs" / "final")], [task(t)],
                                                  t / "runs"), ["results folder for 'final'", "is the model"]),
    ("third_model_broken", lambda t, m: fg(plain_llm_dir(), [m, _broken(t, m)], [task(t)], t / "o"),
     ["--model", "corrupt or truncated"]),
]


def _broken(t: Path, model: Path) -> Path:
    broken = copy_dir(model, t / "broken")
    truncate(broken / "model.safetensors")
    return broken


@pytest.mark.parametrize(("build", "needles"), [c[1:] for c in FORGETTING_CASES],
                         ids=[c[0] for c in FORGETTING_CASES])
def test_forgetting_refuses_before_scoring_anything(tmp_path, capsys, tiny_model_dir, build, needles):
    args = build(tmp_path, tiny_model_dir)
    # not even the base model's results were written
    assert_refused_untouched(capsys, tmp_path, args, "forgetting", *needles)


# ---------------------------------------------------------------------------------------------------------------
# iit build


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("pools")
    text = write_jsonl(root / "text.jsonl", [{"id": f"t{k}", "question": f"{k} + 1?", "options": [str(k + 1), "x"],
                                              "answer": 0} for k in range(3)])
    mm = write_jsonl(root / "mm.jsonl", [{"id": f"v{k}", "question": "what shape?", "answer": "circle",
                                          "image": image_path(k)} for k in range(2)])
    return text, mm


def iit(text, mm, out, *extra):
    return ["iit", "build", "--text-pool", text, "--mm-pool", mm, "--out", out, *extra]


IIT_CASES = [
    ("out_is_the_text_pool", lambda t, p: iit(copy_dir(p[0].parent, t / "p") / "text.jsonl", p[1],
                                              t / "p" / "text.jsonl", "--per-config", "1"), ["is the --text-pool"]),
    ("out_a_directory", lambda t, p: iit(*p, t, "--per-config", "1"), ["is a directory"]),
    ("per_config_zero", lambda t, p: iit(*p, t / "o.jsonl", "--per-config", "0"), ["--per-config", "positive"]),
    ("per_config_huge", lambda t, p: iit(*p, t / "o.jsonl", "--per-config", "1000000000", "--configs", "TTT"),
     ["too many", "6 distinct TTT dialogues"]),
    ("per_config_repeats", lambda t, p: iit(*p, t / "o.jsonl", "--per-config", "4", "--configs", "T"),
     ["only 3 distinct T dialogues", "scored twice"]),
    ("configs_bad_letter", lambda t, p: iit(*p, t / "o.jsonl", "--configs", "TX"), ["'TX'"]),
    ("configs_empty", lambda t, p: iit(*p, t / "o.jsonl", "--configs", ","), ["''"]),
    ("configs_repeat", lambda t, p: iit(*p, t / "o.jsonl", "--configs", "T,T"), ["repeat"]),
    ("text_pool_with_images", lambda t, p: iit(p[1], p[1], t / "o.jsonl"), ["has images"]),
    ("mm_pool_without_images", lambda t, p: iit(p[0], p[0], t / "o.jsonl"), ["has no image"]),
    ("pool_latin1", lambda t, p: iit(latin1(t / "l.jsonl", '{"id": "caf\u00e9"}\n'), p[1], t / "o.jsonl"),
     ["not UTF-8"]),
]


@pytest.mark.parametrize(("build", "needles"), [c[1:] for c in IIT_CASES], ids=[c[0] for c in IIT_CASES])
def test_iit_build_refuses_clearly(tmp_path, capsys, pools, build, needles):
    args = build(tmp_path, pools)
    assert_refused_untouched(capsys, tmp_path, args, "iit build", *needles)


# ---------------------------------------------------------------------------------------------------------------
# laws


def lw(model, data, out, *extra):
    return ["laws", model, "--device", "cpu", "--data", data, "--out", out, *extra]


LAWS_CASES = [
    ("record_without_image", lambda t, m: lw(m, task(t), t / "o"), ["'ok'", "no image"]),
    ("image_strip_bomb", lambda t, m: lw(m, task(t, {"id": "strip", "question": "<image> q?", "answer": "x",
                                                       "image": str(strip_png(t / "s.png"))}), t / "o"),
     ["'strip'", "aspect ratio"]),
    ("max_items_zero", lambda t, m: lw(m, task(t), t / "o", "--max-items", "0"), ["--max-items", "positive"]),
    ("max_items_negative", lambda t, m: lw(m, task(t), t / "o", "--max-items", "-1"), ["--max-items"]),
    ("batch_size_zero", lambda t, m: lw(m, task(t), t / "o", "--batch-size", "0"), ["--batch-size"]),
    ("out_a_file", lambda t, m: lw(m, task(t), _file(t / "o")), ["is a file"]),
    ("out_is_the_model", lambda t, m: lw(copy_dir(m, t / "m"), task(t), t / "m"), ["is the MODEL_DIR"]),
    ("data_is_the_output", lambda t, m: lw(m, write_jsonl(t / "o" / "laws.json", [OK]), t / "o"),
     ["laws.json is the --data"]),
]


@pytest.mark.parametrize(("build", "needles"), [c[1:] for c in LAWS_CASES], ids=[c[0] for c in LAWS_CASES])
def test_laws_refuses_clearly(tmp_path, capsys, tiny_model_dir, build, needles):
    args = build(tmp_path, tiny_model_dir)
    assert_refused_untouched(capsys, tmp_path, args, "laws", *needles)
