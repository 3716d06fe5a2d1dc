"""Hostile training data: image bombs, odd and broken image files, text that must be cut, records the model cannot
take, encodings, absurd JSON. Every record is kept, skipped or changed by a counted reason in the report (nothing
silent), and two end-to-end runs show the counts land in data_report.json."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from hostile_support import (
    FAST,
    assert_ok,
    header_bomb_png,
    image_path,
    llava_records,
    strip_png,
    wings,
    write_json,
)
from wings.data import build_dataset


@pytest.fixture(scope="module")
def processor(make_tiny):
    return make_tiny()[1]


def conv(question: str, answer: str = "yes") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def pixels_broken_png(path: Path) -> Path:
    """Valid PNG chunks and CRCs (so `verify` passes) around compressed data that cannot be decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib data" * 4)
                     + chunk(b"IEND", b""))
    return path


def image_file(tmp: Path, kind: str) -> Path:
    """One image (or non-image) file of the given kind."""
    source = Image.open(image_path(0)).convert("RGB")
    path = tmp / f"{kind}.img"
    if kind == "strip_100000x1":
        return strip_png(path)
    if kind == "header_bomb_20000x20000":
        return header_bomb_png(path)
    if kind == "tall_1x5000":
        return _tall(path)
    if kind == "pixels_broken":
        return pixels_broken_png(path)
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "text_file":
        path.write_text("not an image")
    elif kind == "truncated_png":
        source.save(path, format="PNG")
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling_symlink":
        path.symlink_to(tmp / "nowhere.png")
    elif kind == "symlink_loop":
        path.symlink_to(path)
    elif kind == "rgba_png":
        source.convert("RGBA").save(path, format="PNG")
    elif kind == "palette_gif":
        source.convert("P").save(path, format="GIF")
    elif kind == "cmyk_jpeg":
        source.convert("CMYK").save(path, format="JPEG")
    elif kind == "grey_16bit_png":
        source.convert("I;16").save(path, format="PNG")
    elif kind == "one_bit_png":
        source.convert("1").save(path, format="PNG")
    elif kind == "webp":
        source.save(path, format="WEBP")
    elif kind == "exif_rotated_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90
        source.resize((48, 32)).save(path, format="JPEG", exif=exif)
    elif kind == "one_pixel":
        source.resize((1, 1)).save(path, format="PNG")
    return path


def _tall(path: Path) -> Path:
    Image.new("RGB", (1, 5000)).save(path, format="PNG")
    return path


# image kind -> (scan outcome with image_check=verify: "kept" or the skip reason)
IMAGE_KINDS = {
    "strip_100000x1": "image_limits",
    "header_bomb_20000x20000": "image_limits",
    "tall_1x5000": "image_limits",
    "empty_file": "corrupt_image",
    "text_file": "corrupt_image",
    "truncated_png": "corrupt_image",
    "directory": "missing_image",
    "dangling_symlink": "missing_image",
    "symlink_loop": "missing_image",
    "rgba_png": "kept",
    "palette_gif": "kept",
    "cmyk_jpeg": "kept",
    "grey_16bit_png": "kept",
    "one_bit_png": "kept",
    "webp": "kept",
    "exif_rotated_jpeg": "kept",
    "one_pixel": "kept",
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_each_image_is_kept_and_loads_or_is_skipped_by_reason(tmp_path, processor, kind):
    image = image_file(tmp_path, kind)
    records = [{"id": "x", "image": str(image), "conversations": conv("<image>\nwhat?")}, *llava_records(1)]
    ds = build_dataset(write_json(tmp_path / "d.json", records), processor, progress=False, max_length=128)
    expected = IMAGE_KINDS[kind]
    if expected == "kept":
        assert len(ds) == 2 and ds.report["skipped"] == 0
        sample = ds[0]
        assert sample["pixel_values"].shape[0] == 1 and not ds.lazy_failures
    else:
        assert len(ds) == 1 and ds.report["skipped_by_reason"] == {expected: 1}
        assert ds.report["skipped_records"][0]["id"] == "x" and str(image.name) in ds.report["skipped_records"][0][
            "detail"]


@pytest.mark.parametrize("kind", ["strip_100000x1", "header_bomb_20000x20000", "pixels_broken"])
def test_an_image_failing_only_at_load_time_is_replaced_and_logged(tmp_path, processor, kind):
    """With the cheap scan (`exists`) a bomb or undecodable image reaches the loader: it refuses it before
    allocating, the next record stands in, and the failure is logged for the report (never silent)."""
    image = image_file(tmp_path, kind)
    records = [{"id": "bad", "image": str(image), "conversations": conv("<image>\nwhat?")}, *llava_records(1)]
    log = tmp_path / "failures.jsonl"
    ds = build_dataset(write_json(tmp_path / "d.json", records), processor, progress=False, max_length=128,
                       image_check="exists", failure_log=log)
    with pytest.warns(UserWarning, match="record id='bad'"):
        sample = ds[0]
    assert sample["pixel_values"].shape[0] == 1  # the good record stood in
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["id"], e["reason"]) for e in logged] == [("bad", "corrupt_image" if kind == "pixels_broken"
                                                          else "image_limits")]


def _raw(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


GOOD_LINE = json.dumps({"id": "ok", "conversations": conv("hi", "hello")}).encode()
# (id, file name, bytes, expected: ("kept", n) or ("skipped", {reason: n}) or ("error", needle))
FILE_CASES = [
    ("utf8_bom_jsonl", "d.jsonl", b"\xef\xbb\xbf" + GOOD_LINE + b"\n", ("kept", 1)),
    ("utf8_bom_json", "d.json", b"\xef\xbb\xbf[" + GOOD_LINE + b"]", ("kept", 1)),
    ("latin1_line", "d.jsonl", GOOD_LINE + b"\n" + b'{"id": "caf\xe9"}\n', ("skipped", {"not_utf8": 1})),
    ("latin1_json_file", "d.json", b'[{"id": "caf\xe9"}]', ("error", "not UTF-8")),
    ("nul_bytes", "d.jsonl", GOOD_LINE + b"\n\x00\x00\x00\n", ("skipped", {"malformed_json": 1})),
    ("binary_garbage", "d.jsonl", GOOD_LINE + b"\n" + bytes(range(256)) + b"\n",  # holds a newline: two lines
     ("skipped", {"malformed_json": 1, "not_utf8": 1})),
    ("deep_nesting_line", "d.jsonl", GOOD_LINE + b"\n" + b"[" * 200_000 + b"\n", ("skipped", {"malformed_json": 1})),
    ("deep_nesting_file", "d.json", b"[" * 200_000, ("error", "nested too deeply")),
    ("crlf_line_ends", "d.jsonl", GOOD_LINE + b"\r\n" + GOOD_LINE.replace(b'"ok"', b'"ok2"') + b"\r\n", ("kept", 2)),
    ("nul_in_image_path", "d.jsonl", GOOD_LINE + b"\n" + json.dumps(
        {"id": "n", "image": "a\u0000b.png", "conversations": conv("<image>")}).encode() + b"\n",
     ("skipped", {"bad_fields": 1})),
    ("image_list_of_numbers", "d.jsonl", GOOD_LINE + b"\n" + json.dumps(
        {"id": "n", "images": [1, 2], "conversations": conv("hi")}).encode() + b"\n", ("skipped", {"bad_fields": 1})),
    ("only_blank_lines", "d.jsonl", b"\n\n  \n", ("error", "no usable record")),
]


@pytest.mark.parametrize(("name", "data", "expected"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_odd_encodings_and_json_are_skips_or_named_errors(tmp_path, processor, name, data, expected):
    path = _raw(tmp_path, name, data)
    kind, value = expected
    if kind == "error":
        with pytest.raises(ValueError, match=value) as err:
            build_dataset(path, processor, progress=False)
        assert str(path) in str(err.value)
        return
    ds = build_dataset(path, processor, progress=False)
    if kind == "kept":
        assert len(ds) == value and ds.report["skipped"] == 0
    else:
        assert ds.report["skipped_by_reason"] == value and len(ds) == 1


def test_truncation_is_counted_and_a_cut_through_an_image_is_a_skip(tmp_path, processor):
    records = [
        {"id": "essay", "conversations": conv("Summarise.", "word " * 10_000)},  # a 50k-character answer
        {"id": "late_image", "image": image_path(0), "conversations": conv("word " * 200 + "<image>")},
        {"id": "many_images", "images": [image_path(0)] * 20, "conversations": conv("<image>" * 20)},
        *llava_records(1),
    ]
    ds = build_dataset(write_json(tmp_path / "d.json", records), processor, progress=False, max_length=128)
    report = ds.report
    assert report["changed_by_reason"] == {"truncated": 1} and report["changed_records"][0]["id"] == "essay"
    assert "cut to max_length=128" in report["changed_records"][0]["detail"]
    assert report["skipped_by_reason"] == {"truncated_image": 2}
    assert sorted(e["id"] for e in report["skipped_records"]) == ["late_image", "many_images"]
    assert len(ds) == 2 and ds.modality.count("image") == 1  # no image record silently became a text record


def test_records_longer_than_the_router_are_found_by_the_scan(tmp_path, processor):
    records = [{"id": "long", "conversations": conv("word " * 600, "ok")}, *llava_records(2)]
    ds = build_dataset(write_json(tmp_path / "d.json", records), processor, progress=False, max_length=2048,
                       context_length=256)
    assert ds.report["skipped_by_reason"] == {"over_context": 1}
    entry = ds.report["skipped_records"][0]
    assert entry["id"] == "long" and "at most 256" in entry["detail"] and "data.max_length" in entry["detail"]
    assert max(ds.lengths) <= 256


# ---------------------------------------------------------------------------------------------------------------
# End to end: the counts land in output_dir/data_report.json, and the run does not die mid-way.


@pytest.fixture(scope="module")
def hostile_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_data")
    records = llava_records(4) + [
        {"id": "strip", "image": str(strip_png(root / "strip.png")), "conversations": conv("<image>\nwhat?")},
        {"id": "bomb", "image": str(header_bomb_png(root / "bomb.png")), "conversations": conv("<image>\nwhat?")},
        {"id": "essay", "image": image_path(1), "conversations": conv("<image>\nWrite.", "word " * 10_000)},
        {"id": "late_image", "image": image_path(2), "conversations": conv("word " * 200 + "<image>")},
        {"id": "pixels_broken", "image": str(pixels_broken_png(root / "broken.png")),
         "conversations": conv("<image>\nwhat?")},
    ]
    return write_json(root / "data.json", records)


def test_a_training_run_reports_every_skip_change_and_load_time_swap(tmp_path, capsys, tiny_model_dir,
                                                                      hostile_data):
    run = tmp_path / "run"
    sets = [x for s in FAST for x in ("--set", s)]
    outcome = assert_ok(wings(capsys, "train", "wings_stage1", "--model", tiny_model_dir, "--data", hostile_data,
                              "--output-dir", run, "--max-steps", "2", *sets))
    report = json.loads((run / "data_report.json").read_text())
    assert report["skipped_by_reason"] == {"image_limits": 2, "truncated_image": 1}
    assert report["changed_by_reason"] == {"truncated": 1}
    swaps = report["replaced_at_load"]
    assert swaps["by_reason"] == {"corrupt_image": swaps["count"]} and swaps["count"] >= 1
    assert {f["id"] for f in swaps["failures"]} == {"pixels_broken"}
    assert "replaced by the next record" in outcome.err and "image_limits=2" in outcome.err


def test_the_shipped_max_length_with_a_1024_column_router_skips_long_records_up_front(tmp_path, capsys,
                                                                                     tiny_model_dir):
    data = write_json(tmp_path / "d.json", llava_records(4) + [
        {"id": "essay", "conversations": conv("Write.", "word " * 3000)}])
    run = tmp_path / "run"
    sets = [x for s in FAST for x in ("--set", s)] + ["--set", "data.max_length=2048"]
    assert_ok(wings(capsys, "train", "wings_stage2", "--model", tiny_model_dir, "--data", data,
                    "--output-dir", run, "--max-steps", "1", *sets))
    report = json.loads((run / "data_report.json").read_text())
    assert report["context_length"] == 1024 and report["skipped_by_reason"] == {"over_context": 1}
    assert report["skipped_records"][0]["id"] == "essay"
    assert os.path.isdir(run / "final")
