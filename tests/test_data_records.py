"""LLaVA records: parsing, the `<image>` convention, every bad-record reason under `skip` and `error`, the report."""

from __future__ import annotations

import json
import shutil

import easy_vqa
import pytest
import torch
from PIL import Image

from wings.data import REASONS, build_dataset
from wings.processing import IMAGE_TOKEN


@pytest.fixture(scope="module")
def processor(make_tiny):
    return make_tiny(mode="llava")[1]


@pytest.fixture
def images(tmp_path):
    """Real easy-vqa PNGs copied under tmp_path/img, plus a truncated PNG and a non-image file."""
    folder = tmp_path / "img"
    folder.mkdir()
    paths = easy_vqa.get_train_image_paths()
    for k in range(3):
        shutil.copy(paths[k], folder / f"{k}.png")
    data = (folder / "0.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "garbage.png").write_bytes(b"this is not an image")
    Image.new("L", (100_000, 1)).save(folder / "strip.png")  # a few hundred bytes; padding it square: 10^10 pixels
    return folder


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"from": who, "value": text} for who, text in turns]


GOOD = [
    {"id": "single", "image": "img/0.png", "conversations": conv(("human", "<image>\nwhat shape?"), ("gpt", "circle"))},
    {"id": "multi", "images": ["img/1.png", "img/2.png"],
     "conversations": conv(("human", "left <image> right <image>"), ("gpt", "two"), ("human", "ok?"), ("gpt", "yes"))},
    {"id": "text", "conversations": conv(("system", "Be brief."), ("human", "hi"), ("gpt", "hello"))},
]

# One record per reason; each would be kept if it were not for that one defect.
BAD = {
    "bad_fields": {"id": "nofield", "image": "img/0.png"},
    "unknown_role": {"id": "role", "conversations": conv(("human", "hi"), ("bot", "hello"))},
    "role_order": {"id": "order", "conversations": conv(("gpt", "hello"), ("human", "hi"))},
    "empty_turn": {"id": "empty", "conversations": conv(("human", "hi"), ("gpt", "   "))},
    "placeholder_mismatch": {"id": "count", "image": "img/0.png",
                             "conversations": conv(("human", "<image> <image>"), ("gpt", "two"))},
    "missing_image": {"id": "missing", "image": "img/nope.png",
                      "conversations": conv(("human", "<image>"), ("gpt", "x"))},
    "corrupt_image": {"id": "corrupt", "image": "img/truncated.png",
                      "conversations": conv(("human", "<image>"), ("gpt", "x"))},
    "over_long": {"id": "long", "conversations": conv(("human", " ".join(["word"] * 400)), ("gpt", "ok"))},
    "image_limits": {"id": "strip", "image": "img/strip.png",
                     "conversations": conv(("human", "<image>"), ("gpt", "x"))},
    "truncated_image": {"id": "late_image", "image": "img/0.png",
                        "conversations": conv(("human", " ".join(["word"] * 150) + " <image>"), ("gpt", "x"))},
}
MAX_LENGTH = 128


def write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_good_records_multi_turn_multi_image_and_text_only(tmp_path, images, processor):
    ds = build_dataset(write_jsonl(tmp_path / "d.jsonl", GOOD), processor, max_length=MAX_LENGTH, progress=False)
    assert len(ds) == 3
    assert ds.modality == ["image", "image", "text"]
    span = processor.image_seq_length
    counts = [int((ds[i]["input_ids"] == processor.image_token_id).sum()) for i in range(3)]
    assert counts == [span, 2 * span, 0]
    assert [ds[i].get("pixel_values", None) is None for i in range(3)] == [False, False, True]
    assert ds[1]["pixel_values"].shape[0] == 2
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(3)]


def test_images_without_placeholder_go_before_the_first_question(tmp_path, images, processor):
    record = {"id": "nop", "images": ["img/0.png", "img/1.png"],
              "conversations": conv(("system", "sys"), ("human", "what?"), ("gpt", "a"))}
    ds = build_dataset(write_jsonl(tmp_path / "d.jsonl", [record]), processor, progress=False)
    messages = ds.records[0].messages
    assert messages[0]["content"] == "sys"
    assert messages[1]["content"] == f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nwhat?"


def test_image_root_and_json_list(tmp_path, images, processor):
    data_dir = tmp_path / "elsewhere"
    data_dir.mkdir()
    path = data_dir / "d.json"
    path.write_text(json.dumps(GOOD + [BAD["role_order"]]))
    with pytest.raises(ValueError, match=r"d\.json\[index 3\].*id='order'.*role_order"):
        build_dataset(path, processor, image_root=tmp_path, policy="error", progress=False)
    assert len(build_dataset(path, processor, image_root=tmp_path, progress=False)) == 3
    # relative to the data file's own folder by default: the images are not there
    ds = build_dataset(path, processor, progress=False)
    assert ds.report["skipped_by_reason"] == {"missing_image": 2, "role_order": 1}


def test_skip_counts_every_reason_and_writes_the_report(tmp_path, images, processor, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD + list(BAD.values()),
                       raw_lines=['{"id": "broken", "conversations": [', '["a", "list"]'])
    with data.open("ab") as f:
        f.write(b'{"id": "latin1", "conversations": "caf\xe9"}\n')  # not UTF-8: one bad record, not a crash
    garbage = {"id": "garbage", "image": "img/garbage.png", "conversations": conv(("human", "<image>"), ("gpt", "x"))}
    pool = write_jsonl(tmp_path / "text.jsonl", [GOOD[2], GOOD[0]])
    report_path = tmp_path / "out" / "report.json"
    ds = build_dataset([data, write_jsonl(tmp_path / "e.jsonl", [garbage])], processor, max_length=MAX_LENGTH,
                       report_path=report_path, text_mix_path=pool, text_mix_ratio=0.25, progress=False)
    report = json.loads(report_path.read_text())
    expected = {reason: 1 for reason in BAD} | {"malformed_json": 2, "image_in_text_mix": 1, "corrupt_image": 2,
                                                "not_utf8": 1}
    assert report["skipped_by_reason"] == expected
    # over_context needs a model limit (tests/test_hostile_data.py); image_in_reply and template_mismatch are the
    # stock-VLM pipeline's (tests/test_vlm_data.py); bad_unicode is tests/test_hostile_unicode.py's
    assert set(expected) == set(REASONS) - {"over_context", "image_in_reply", "template_mismatch", "bad_unicode"}
    assert report["skipped"] == sum(expected.values()) == len(report["skipped_records"])
    assert report["kept"] == 3 + 1  # three good main records, one good pool record
    assert len(ds) == 3 + 1  # round(3 * 0.25 / 0.75) = 1 text record mixed in
    by_id = {e["id"]: e for e in report["skipped_records"]}
    assert by_id["order"]["location"] == f"{data}:line 6"
    assert by_id["garbage"]["reason"] == "corrupt_image"
    no_id = [(e["location"].rsplit(":", 1)[1], e["reason"]) for e in report["skipped_records"] if e["id"] is None]
    # the cut-off line, `["a", "list"]`, then the latin-1 line
    assert no_id == [("line 14", "malformed_json"), ("line 15", "malformed_json"), ("line 16", "not_utf8")]
    assert not list(report_path.parent.glob(".*tmp"))  # atomic write leaves no temp file
    assert "skipped 15" in capsys.readouterr().err


@pytest.mark.parametrize("reason", sorted(BAD))
def test_error_policy_names_file_line_id_and_reason(tmp_path, images, processor, reason):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], BAD[reason]])
    record_id = BAD[reason]["id"]
    with pytest.raises(ValueError, match=rf"d\.jsonl:line 2 \(record id='{record_id}'\): {reason}"):
        build_dataset(data, processor, max_length=MAX_LENGTH, policy="error", progress=False)


def test_error_policy_on_a_malformed_line(tmp_path, processor):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD[2]], raw_lines=["", "{nope"])
    with pytest.raises(ValueError, match=r"d\.jsonl:line 3 .*malformed_json"):
        build_dataset(data, processor, policy="error", progress=False)


def test_file_level_errors(tmp_path, processor):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        build_dataset(tmp_path / "absent.jsonl", processor)
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(GOOD[2]) + "\n" + json.dumps(GOOD[2]) + "\n")
    with pytest.raises(ValueError, match=r"lines\.json is not valid JSON.*\.jsonl"):
        build_dataset(lines, processor)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps(GOOD[2]))
    with pytest.raises(ValueError, match="expected a list of records"):
        build_dataset(obj, processor)
    empty = write_jsonl(tmp_path / "bad_only.jsonl", [BAD["role_order"]])
    with pytest.raises(ValueError, match="no usable record.*role_order=1"):
        build_dataset(empty, processor, progress=False)
    with pytest.raises(ValueError, match="policy"):
        build_dataset(empty, processor, policy="ignore")


def test_an_image_that_breaks_after_the_scan_follows_the_policy(tmp_path, images, processor):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    skip = build_dataset(data, processor, progress=False)
    strict = build_dataset(data, processor, policy="error", progress=False)
    (images / "0.png").write_bytes(b"overwritten")
    with pytest.warns(UserWarning, match=r"d\.jsonl:line 1 \(record id='single'\): corrupt_image"):
        item = skip[0]
    assert torch.equal(item["input_ids"], skip[1]["input_ids"])  # the next record stands in, deterministically
    assert skip.lazy_failures and len(skip) == 3
    with pytest.raises(ValueError, match=r"d\.jsonl:line 1 \(record id='single'\): corrupt_image"):
        strict[0]


def test_a_cut_through_an_image_is_a_skip_not_a_text_record(tmp_path, images, processor):
    record = {"id": "late", "image": "img/0.png",
              "conversations": conv(("human", "hi"), ("gpt", "hello"), ("human", "<image>\nand this?"), ("gpt", "a"))}
    data = write_jsonl(tmp_path / "d.jsonl", [record, {"id": "short", "conversations": conv(("human", "hi"),
                                                                                          ("gpt", "hello"))}])
    ds = build_dataset(data, processor, max_length=20, progress=False)
    assert len(ds) == 1 and ds.modality == ["text"]  # only the text record is left
    assert ds.report["skipped_by_reason"] == {"truncated_image": 1}
    assert ds.report["skipped_records"][0]["id"] == "late"
    assert build_dataset(data, processor, max_length=200, progress=False).modality == ["image", "text"]
