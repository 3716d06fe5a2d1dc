"""Task files: good records parse (answers by text, index or letter; relative images), bad ones are rejected with
the file, line and record id in the message; `wings eval` turns them into a one-line error, exit code 2."""

from __future__ import annotations

import json
import shutil

import pytest

from test_eval_common import vqa_records, write_jsonl
from wings.cli import main
from wings.evaluation.tasks import TaskError, load_task, messages


def test_good_records(tmp_path):
    image = vqa_records(1)[0]["image"]
    shutil.copy(image, tmp_path / "img.png")
    recs = [
        {"id": "a", "question": "q?", "options": ["x", "y"], "answer": "y"},
        {"id": "b", "question": "q?", "options": ["x", "y"], "answer": 0},
        {"id": "c", "question": "q?", "options": ["x", "y", "z"], "answer": "C"},
        {"id": 7, "question": "what is it?", "answer": ["cat", "kitten"], "image": "img.png"},
        {"id": "e", "question": "and <image> this?", "answer": "no", "images": ["img.png"],
         "context": [{"question": "look", "answer": "ok", "image": image}, {"question": "hi", "answer": "hello"}]},
    ]
    task = load_task(write_jsonl(tmp_path / "good.jsonl", recs))
    assert task.name == "good"
    assert [i.answer_index for i in task.items[:3]] == [1, 0, 2]
    assert [i.gold for i in task.items[:3]] == ["y", "x", "z"]
    assert task.items[3].id == "7" and task.items[3].answers == ["cat", "kitten"] and not task.items[3].is_mc
    assert task.items[3].images == [tmp_path / "img.png"]
    e = task.items[4]
    assert [str(p) for p in e.all_images] == [image, str(tmp_path / "img.png")]
    chat = messages(e)
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant", "user"]
    assert chat[0]["content"] == "<image>\nlook" and chat[1]["content"] == "ok"
    assert chat[4]["content"] == "and <image> this?"  # placeholder kept where the question puts it
    assert task.has_images


BAD = [
    ({"question": "q", "answer": "x"}, "missing or empty field 'id'"),
    ({"id": "r1", "answer": "x"}, "missing field 'question'"),
    ({"id": "r1", "question": "q"}, "missing field 'answer'"),
    ({"id": "r1", "question": "  ", "answer": "x"}, "'question' must be a non-empty string"),
    ({"id": "r1", "question": "q", "options": [], "answer": 0}, "non-empty list"),
    ({"id": "r1", "question": "q", "options": ["a", ""], "answer": 0}, "non-empty string"),
    ({"id": "r1", "question": "q", "options": ["a", "a"], "answer": 0}, "duplicates"),
    ({"id": "r1", "question": "q", "options": ["a", "b"], "answer": "c"}, "not one of the options"),
    ({"id": "r1", "question": "q", "options": ["a", "b"], "answer": 5}, "out of range"),
    ({"id": "r1", "question": "q", "answer": ""}, "non-empty string"),
    ({"id": "r1", "question": "q", "answer": "x", "image": "nowhere.png"}, "unknown image 'nowhere.png'"),
    ({"id": "r1", "question": "<image> <image>", "answer": "x", "image": "IMG"}, "2 <image> placeholders but 1"),
    ({"id": "r1", "question": "q", "answer": "x", "context": [{"question": "x"}]}, "context turn 0: missing field"),
    ({"id": "r1", "question": "q", "answer": "x", "context": "hi"}, "'context' must be a list"),
    ({"id": "r1", "question": "q", "answer": "x", "config": "TXV"}, "'config' must be a string of T and V"),
    ({"id": "r1", "question": "q", "answer": "x", "image": "IMG", "images": ["IMG"]}, "not both"),
]


@pytest.mark.parametrize(("record", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_record_names_file_line_and_id(tmp_path, record, message):
    image = vqa_records(1)[0]["image"]
    record = json.loads(json.dumps(record).replace('"IMG"', json.dumps(image)))
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "ok", "question": "q", "answer": "x"}, record])
    with pytest.raises(TaskError) as err:
        load_task(path)
    text = str(err.value)
    assert message in text and str(path) in text and "line 2" in text
    if "id" in record:
        assert "'r1'" in text


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskError, match="no records"):
        load_task(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"id": "a", "question": "q", "answer": "x"}\n{"id": \n')
    with pytest.raises(TaskError, match="line 2: not valid JSON"):
        load_task(tmp_path / "broken.jsonl")
    write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "question": "q", "answer": "x"}] * 2)
    with pytest.raises(TaskError, match="line 2 \\(id 'a'\\): duplicate id, first seen on line 1"):
        load_task(tmp_path / "dup.jsonl")


def test_cli_reports_bad_task_in_one_line(tiny_model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "q17", "question": "q", "options": [], "answer": 0}])
    assert main(["eval", str(tiny_model_dir), "--task", str(path), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'q17'" in err and "options" in err
    assert not (tmp_path / "r.json").exists()
