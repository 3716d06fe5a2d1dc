"""Text that is not Unicode, wherever text enters a command (issue 21, class 2). JSON's `\\ud800` escapes carry half
of a UTF-16 pair, and Python hands undecodable command-line or terminal bytes on as U+DC80..U+DCFF: such a str has
no UTF-8 form, and the tokenizer used to fail on it with `TypeError: TextEncodeInput must be ...` (a traceback).

The rule everywhere: task files (eval, forgetting, laws, iit build) are refused naming the file, line, record id
and field; a training record is skipped and counted as `bad_unicode` (or stops the run under `data.policy: error`);
a text flag is refused by argparse naming the flag; a chat turn is refused and the conversation goes on; a name that
only reaches us as a folder name (an eval label) is written with `\\uXXXX` escapes. The server's cases are in
tests/test_serve_api.py."""

from __future__ import annotations

import json

import pytest

from hostile_support import (
    assert_ok,
    assert_refused,
    assert_refused_untouched,
    image_path,
    llava_records,
    plain_llm_dir,
    train_args,
    wings,
    write_json,
    write_jsonl,
)

BAD = "bad \ud800 text"  # the example: valid JSON once written (json.dumps escapes it)
TERMINAL = "caf\udce9"  # what Python makes of the Latin-1 bytes `caf\xe9` on a UTF-8 command line
OK = {"id": "ok", "question": "What is 1 + 1?", "options": ["2", "3"], "answer": "2"}


def task(tmp, record, name: str = "task"):
    return write_jsonl(tmp / f"{name}.jsonl", [OK, record])


# (id, the bad record, the field the message must name)
TASK_RECORDS = [
    ("question", {"id": "q", "question": BAD, "answer": "yes"}, "question holds a lone surrogate (U+D800"),
    ("open_answer", {"id": "a", "question": "q?", "answer": ["yes", BAD]}, "answer[1] holds"),
    ("option", {"id": "o", "question": "q?", "options": ["2", BAD], "answer": 0}, "options[1] holds"),
    ("context_turn", {"id": "c", "question": "q?", "answer": "x", "context": [{"question": BAD, "answer": "y"}]},
     "context[0].question holds"),
    ("id", {"id": "bad \udfff id", "question": "q?", "answer": "x"}, "id holds a lone surrogate (U+DFFF"),
    ("image_path", {"id": "i", "question": "q?", "answer": "x", "image": "pic\ud800.png"}, "image holds"),
]


@pytest.mark.parametrize(("record", "needle"), [c[1:] for c in TASK_RECORDS], ids=[c[0] for c in TASK_RECORDS])
def test_eval_refuses_a_task_record_that_is_not_unicode(tmp_path, capsys, tiny_model_dir, record, needle):
    args = ["eval", tiny_model_dir, "--device", "cpu", "--task", task(tmp_path, record), "--out", tmp_path / "r.json"]
    line = assert_refused_untouched(capsys, tmp_path, args, "eval", "task.jsonl line 2", needle)
    line.encode("utf-8")  # the message itself is text (an id is shown escaped)
    if not needle.startswith("id "):
        assert f"(id {record['id']!r})" in line


def test_forgetting_laws_and_iit_refuse_it_too(tmp_path, capsys, tiny_model_dir):
    bad = task(tmp_path, {"id": "q", "question": BAD, "answer": "yes"})
    forgetting = ["forgetting", "--base", plain_llm_dir(), "--model", tiny_model_dir, "--task", bad, "--device", "cpu",
                  "--out", tmp_path / "f"]
    assert_refused_untouched(capsys, tmp_path, forgetting, "forgetting", "line 2 (id 'q')", "question holds")
    laws_data = write_jsonl(tmp_path / "laws.jsonl", [{"id": "v", "question": f"<image> {BAD}", "answer": "circle",
                                                       "image": image_path(0)}])
    laws = ["laws", tiny_model_dir, "--device", "cpu", "--data", laws_data, "--out", tmp_path / "l"]
    assert_refused_untouched(capsys, tmp_path, laws, "laws", "line 1 (id 'v')", "question holds")
    mm = write_jsonl(tmp_path / "mm.jsonl", [{"id": "v", "question": "what shape?", "answer": "circle",
                                              "image": image_path(0)}])
    iit = ["iit", "build", "--text-pool", bad, "--mm-pool", mm, "--out", tmp_path / "iit.jsonl"]
    assert_refused_untouched(capsys, tmp_path, iit, "iit build", "line 2 (id 'q')", "question holds")


# ---------------------------------------------------------------------------------------------------------------
# training data: a counted skip (the data policy's rule), never a traceback mid-scan


def conv(question: str, answer: str = "fine") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_training_records_that_are_not_unicode_are_skipped_and_counted(tmp_path, processor):
    from wings.atomic import write_json_atomic
    from wings.data import build_dataset

    records = [{"id": "good", "conversations": conv("hi")},
               {"id": "turn", "conversations": conv("hi", BAD)},
               {"id": "bad \udcff id", "conversations": conv("hi")},
               {"id": "role", "conversations": [{"from": "human\ud800", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    ds = build_dataset(path, processor, progress=False)
    assert len(ds) == 1 and ds.report["skipped_by_reason"] == {"bad_unicode": 3}
    skipped = {e["id"]: e["detail"] for e in ds.report["skipped_records"]}
    assert "conversations[1].value holds a lone surrogate (U+D800 at character 4)" in skipped["turn"]
    assert "conversations[0].from holds" in skipped["role"]
    assert "bad \\udcff id" in skipped  # the id, escaped: the report must stay writable as UTF-8
    written = write_json_atomic(tmp_path / "report.json", ds.report)
    assert json.loads(written.read_text(encoding="utf-8"))["skipped"] == 3


def test_with_policy_error_a_record_that_is_not_unicode_stops_the_run_by_name(tmp_path, capsys, tiny_model_dir):
    data = write_json(tmp_path / "d.json", [*llava_records(2), {"id": "x", "conversations": conv(BAD)}])
    args = train_args(tiny_model_dir, data, tmp_path / "run", "--set", "data.policy=error")
    assert_refused_untouched(capsys, tmp_path, args, "train", "d.json[index 2]", "record id='x'", "bad_unicode",
                             "conversations[0].value")


# ---------------------------------------------------------------------------------------------------------------
# command-line text and chat turns


def chat(model, *args):
    return ["chat", model, "--device", "cpu", "--max-new-tokens", "3", *args]


FLAG_CASES = [
    ("chat_prompt", "chat", lambda t, m: chat(m, TERMINAL), "argument PROMPT"),
    ("chat_system", "chat", lambda t, m: chat(m, "--system", TERMINAL, "hi"), "argument --system"),
    ("chat_stop", "chat", lambda t, m: chat(m, "--stop", TERMINAL, "hi"), "argument --stop"),
    ("eval_label", "eval", lambda t, m: ["eval", m, "--task", task(t, OK | {"id": "b"}), "--label", TERMINAL],
     "argument --label"),
    ("forgetting_base_label", "forgetting", lambda t, m: ["forgetting", "--base", m, "--model", m, "--task", t,
                                                          "--base-label", TERMINAL], "argument --base-label"),
    ("serve_api_key", "serve", lambda t, m: ["serve", m, "--api-key", TERMINAL], "argument --api-key"),
    ("serve_name", "serve", lambda t, m: ["serve", m, "--served-model-name", TERMINAL],
     "argument --served-model-name"),
]


@pytest.mark.parametrize(("command", "build", "needle"), [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_text_flags_with_undecodable_bytes_are_refused_by_name(tmp_path, capsys, tiny_model_dir, command, build,
                                                               needle):
    assert_refused(wings(capsys, *build(tmp_path, tiny_model_dir)), command, needle, "U+DCE9", "not text")


def test_a_chat_turn_that_is_not_unicode_is_refused_and_the_chat_goes_on(capsys, monkeypatch, tiny_model_dir):
    """A terminal whose stdin decodes with surrogateescape (a C locale) hands such a line to the REPL."""
    feed = iter([f"what is {TERMINAL}?", "what is 2 + 2?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(feed))
    outcome = assert_ok(wings(capsys, *chat(tiny_model_dir, "--no-stream")))
    err = " ".join(outcome.err.split())
    assert "error: the message holds U+DCE9 at character 11, which is not text" in err
    assert outcome.out.count("\n") >= 1  # the good turn after it was answered (the reply, then a newline)


def test_results_holding_text_that_is_not_unicode_are_written_with_escapes(tmp_path):
    """A label taken from a folder whose name is not UTF-8 reaches the results writer as such text."""
    from wings.evaluation.io import write_json, write_jsonl

    data = {"model": f"run-{TERMINAL}", "accuracy": 0.5, "note": "caf\u00e9"}
    out = write_json(tmp_path / "r.json", data)
    assert json.loads(out.read_text(encoding="utf-8")) == data  # JSON's \uXXXX escapes keep it exactly
    rows = write_jsonl(tmp_path / "p.jsonl", [data, {"note": "plain caf\u00e9"}])
    lines = rows.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [data, {"note": "plain caf\u00e9"}]
    assert "caf\u00e9" in lines[1]  # text that is Unicode is still written as text



def test_inputs_at_paths_that_are_not_utf8_work_end_to_end(tmp_path, capsys, monkeypatch, tiny_model_dir):
    """A file name that is not UTF-8 (Latin-1 `caf\\xe9`) is a valid path: its name reaches Python as a lone
    surrogate, and the run identity, the data report and the results, which name it, used to fail to write
    (`'utf-8' codec can't encode character '\\udce9'`) after the model had been loaded."""
    import io
    import os
    import sys

    from wings.cli import main

    folder = tmp_path / os.fsdecode(b"caf\xe9")
    data = write_json(folder / "train.json", llava_records(2))
    tasks = write_jsonl(folder / "t.jsonl", [OK])
    assert_ok(wings(capsys, *train_args(tiny_model_dir, data, tmp_path / "run", steps=1)))
    identity = json.loads((tmp_path / "run" / "run_identity.json").read_text(encoding="utf-8"))
    assert str(data.resolve()) in json.dumps(identity, ensure_ascii=False)  # the same path, read back
    rerun = assert_ok(wings(capsys, *train_args(tiny_model_dir, data, tmp_path / "run", "--resume", "auto",
                                                steps=1)))
    assert "nothing to do" in rerun.out  # the identity read back equals the one computed now
    # `wings eval` ends with `wrote PATH` on stdout: a strict UTF-8 stdout (a UTF-8 terminal; pytest's capture) could
    # not encode it; the path is printed back as the bytes it was, as `ls` prints it.
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["eval", str(tiny_model_dir), "--device", "cpu", "--task", str(tasks), "--out",
                 str(folder / "r.json")]) == 0
    stdout.flush()
    assert b"caf\xe9/r.json" in stdout.buffer.getvalue()
    results = json.loads((folder / "r.json").read_text(encoding="utf-8"))
    assert results["tasks"]["t"]["n"] == 1
