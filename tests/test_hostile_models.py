"""Hostile input to the commands that read or write model directories: init-model, convert-official, and the
model checks every loading command shares (a plain LLM where a Wings model belongs, corrupt or truncated weights,
non-UTF-8 or non-JSON config files, wrong kinds of path). Each case: one clear error line naming the thing (exit 2,
no traceback), and nothing destroyed or half-written."""

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
    enospc_midway,
    hidden_leftovers,
    latin1,
    plain_llm_dir,
    snapshot,
    truncate,
    vision_dir,
    wings,
)


def tiny(out, *extra):
    return ["init-model", "--preset", "tiny", "--out", out, *extra]


def from_dirs(llm, vision, out, *extra):
    return ["init-model", "--llm", llm, "--vision", vision, "--out", out, *extra]


def broken_llm(tmp: Path, damage: str) -> Path:
    llm = copy_dir(plain_llm_dir(), tmp / "llm")
    if damage == "no_config":
        (llm / "config.json").unlink()
    elif damage == "latin1_config":
        latin1(llm / "config.json", '{"model_type": "qwen2", "name": "caf\u00e9"}')
    elif damage == "config_not_json":
        (llm / "config.json").write_text("{model_type: qwen2")
    elif damage == "config_a_list":
        (llm / "config.json").write_text("[1, 2]")
    elif damage == "truncated_weights":
        truncate(llm / "model.safetensors")
    elif damage == "empty_weights":
        (llm / "model.safetensors").write_bytes(b"")
    elif damage == "no_weights":
        (llm / "model.safetensors").unlink()
    elif damage == "weights_dir":
        (llm / "model.safetensors").unlink()
        (llm / "model.safetensors").mkdir()
    elif damage == "index_missing_shard":
        (llm / "model.safetensors").rename(llm / "model-00001-of-00002.safetensors")
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (llm / "model.safetensors.index.json").write_text(json.dumps(index))
    elif damage == "index_escapes_dir":
        (llm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/x.safetensors"}}))
    return llm


# (case id, args builder (tmp, tiny_model_dir) -> argv, needles in the error line)
INIT_MODEL_CASES = [
    ("out_is_a_file", lambda t, m: tiny(_file(t / "out")), ["is a file"]),
    ("out_parent_is_a_file", lambda t, m: tiny(_file(t / "f") / "out"), ["is a file"]),
    ("out_holds_a_model", lambda t, m: tiny(copy_dir(m, t / "existing")), ["exists and is not empty", "--overwrite"]),
    ("out_is_the_llm", lambda t, m: from_dirs(copy_dir(plain_llm_dir(), t / "llm"), vision_dir(), t / "llm",
                                              "--overwrite"), ["is the --llm"]),
    ("out_contains_the_llm", lambda t, m: from_dirs(copy_dir(plain_llm_dir(), t / "a" / "llm"), vision_dir(),
                                                    t / "a", "--overwrite"), ["contains the --llm"]),
    ("out_inside_the_vision_dir", lambda t, m: from_dirs(plain_llm_dir(), copy_dir(vision_dir(), t / "v"),
                                                         t / "v" / "sub"), ["inside the --vision"]),
    ("llm_missing", lambda t, m: from_dirs(t / "nope", vision_dir(), t / "o"), ["nope does not exist"]),
    ("llm_is_a_file", lambda t, m: from_dirs(_file(t / "llm.bin"), vision_dir(), t / "o"), ["llm.bin is a file"]),
    ("llm_is_a_wings_model", lambda t, m: from_dirs(m, vision_dir(), t / "o"), ["a Wings model", "not a causal"]),
    ("llm_is_a_vision_encoder", lambda t, m: from_dirs(vision_dir(), vision_dir(), t / "o"),
     ["siglip", "not a causal"]),
    ("vision_is_an_llm", lambda t, m: from_dirs(plain_llm_dir(), plain_llm_dir(), t / "o"),
     ["qwen2", "not a vision encoder"]),
    ("rank_zero", lambda t, m: tiny(t / "o", "--rank", "0"), ["--rank", "positive"]),
    ("rank_not_a_number", lambda t, m: tiny(t / "o", "--rank", "big"), ["--rank", "integer"]),
    ("projector_bomb", lambda t, m: tiny(t / "o", "--projector", "mlp99999999x_gelu"), ["--projector", "1..8"]),
    ("projector_unknown", lambda t, m: tiny(t / "o", "--projector", "conv"), ["--projector"]),
    ("preset_and_llm", lambda t, m: tiny(t / "o", "--llm", plain_llm_dir()), ["not both"]),
    ("nothing_to_build", lambda t, m: ["init-model", "--out", t / "o"], ["--llm and --vision"]),
] + [
    (f"llm_{damage}", lambda t, m, d=damage: from_dirs(broken_llm(t, d), vision_dir(), t / "o"), [needle])
    for damage, needle in [
        ("no_config", "no config.json"), ("latin1_config", "not UTF-8"), ("config_not_json", "not valid JSON"),
        ("config_a_list", "expected an object"), ("truncated_weights", "corrupt or truncated"),
        ("empty_weights", "corrupt or truncated"), ("no_weights", "has no weights"),
        ("weights_dir", "has no weights"), ("index_missing_shard", "missing from"),
        ("index_escapes_dir", "outside"),
    ]
]


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize(("build", "needles"), [c[1:] for c in INIT_MODEL_CASES],
                         ids=[c[0] for c in INIT_MODEL_CASES])
def test_init_model_refuses_clearly_and_changes_nothing(tmp_path, capsys, tiny_model_dir, build, needles):
    args = build(tmp_path, tiny_model_dir)
    line = assert_refused_untouched(capsys, tmp_path, args, "init-model", *needles)
    assert "Traceback" not in line


def test_init_model_overwrite_replaces_a_model_whole(tmp_path, capsys, tiny_model_dir):
    out = copy_dir(tiny_model_dir, tmp_path / "m")
    (out / "stale.txt").write_text("from the old model")
    assert_ok(wings(capsys, *tiny(out, "--overwrite", "--mode", "llava")))
    assert json.loads((out / "config.json").read_text())["mode"] == "llava"
    assert not (out / "stale.txt").exists() and not hidden_leftovers(tmp_path)


def test_init_model_refuses_to_replace_a_folder_that_holds_no_model(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    assert_refused(wings(capsys, *tiny(tmp_path / "docs", "--overwrite")), "init-model", "holds no model")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("failure", ["enospc", "read_only", "ctrl_c"])
def test_init_model_failing_mid_save_leaves_nothing(tmp_path, capsys, monkeypatch, failure):
    import transformers.modeling_utils as mu

    out = tmp_path / "model"
    if failure == "enospc":
        enospc_midway(monkeypatch)
    else:
        exc = OSError(errno.EROFS, "Read-only file system", str(out)) if failure == "read_only" else KeyboardInterrupt()

        def fail(*a, **k):
            raise exc

        monkeypatch.setattr(mu, "safe_save_file", fail)
    outcome = wings(capsys, *tiny(out))
    if failure == "ctrl_c":
        assert outcome.rc == 130 and "interrupted" in outcome.err and "Traceback" not in outcome.err
    else:
        assert_refused(outcome, "init-model", "cannot write", "no space left" if failure == "enospc" else "read-only")
    assert not out.exists() and not hidden_leftovers(tmp_path)  # no config.json without weights, no temp folder


def test_init_model_failing_overwrite_keeps_the_old_model(tmp_path, capsys, monkeypatch, tiny_model_dir):
    out = copy_dir(tiny_model_dir, tmp_path / "m")
    before = snapshot(out)
    enospc_midway(monkeypatch)
    assert_refused(wings(capsys, *tiny(out, "--overwrite")), "init-model", "no space left")
    assert snapshot(out) == before and not hidden_leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Commands that load a model: the directory is checked from its config.json before anything is allocated.

LOADERS = {
    "chat": lambda m, t: ["chat", m, "hi", "--max-new-tokens", "1", "--device", "cpu"],
    "eval": lambda m, t: ["eval", m, "--task", t, "--out", t.parent / "r.json", "--device", "cpu"],
    "laws": lambda m, t: ["laws", m, "--data", t, "--out", t.parent / "laws", "--device", "cpu"],
}
MODEL_DAMAGE = {
    "plain_llm": ("not a Wings model", None),
    "missing": ("does not exist", None),
    "a_file": ("is a file", None),
    "no_config": ("no config.json", None),
    "latin1_config": ("not UTF-8", None),
    "config_not_json": ("not valid JSON", None),
    "no_text_config": ("no complete text_config", None),
    "truncated_weights": ("corrupt or truncated", None),
    "no_weights": ("has no weights", None),
    "latin1_tokenizer_config": ("tokenizer_config.json is not UTF-8", None),
}


def damaged_model(tmp: Path, model_dir: Path, damage: str) -> Path:
    if damage == "plain_llm":
        return plain_llm_dir()
    if damage == "missing":
        return tmp / "missing_model"
    if damage == "a_file":
        return _file(tmp / "model.bin")
    m = copy_dir(model_dir, tmp / "model")
    if damage == "no_config":
        (m / "config.json").unlink()
    elif damage == "latin1_config":
        latin1(m / "config.json", '{"model_type": "wings", "caf\u00e9": 1}')
    elif damage == "config_not_json":
        (m / "config.json").write_text('{"model_type": "wings",')
    elif damage == "no_text_config":
        config = json.loads((m / "config.json").read_text())
        del config["text_config"]
        (m / "config.json").write_text(json.dumps(config))
    elif damage == "truncated_weights":
        truncate(m / "model.safetensors", 0.3)
    elif damage == "no_weights":
        (m / "model.safetensors").unlink()
    elif damage == "latin1_tokenizer_config":
        latin1(m / "tokenizer_config.json", '{"x": "caf\u00e9"}')
    return m


@pytest.fixture(scope="module")
def text_task(tmp_path_factory):
    from hostile_support import image_path, write_jsonl

    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    return write_jsonl(path, [{"id": "q1", "question": "<image> what?", "answer": "circle", "image": image_path(0)}])


@pytest.mark.parametrize("damage", sorted(MODEL_DAMAGE))
@pytest.mark.parametrize("command", sorted(LOADERS))
def test_loading_commands_check_the_model_dir_first(tmp_path, capsys, monkeypatch, tiny_model_dir, text_task,
                                                    command, damage):
    if command == "eval" and damage == "plain_llm":
        pytest.skip("eval scores plain LLMs too (text-only tasks): covered in test_hostile_eval.py")
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    def no_allocation(*a, **k):
        raise AssertionError("a model was loaded before the directory was checked")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_allocation)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_allocation)
    model = damaged_model(tmp_path, tiny_model_dir, damage)
    needle = MODEL_DAMAGE[damage][0]
    assert_refused(wings(capsys, *LOADERS[command](model, text_task)), command, needle)


def test_a_plain_llm_is_refused_by_train_before_any_allocation(tmp_path, capsys, monkeypatch):
    from hostile_support import train_args, train_data
    from wings.modeling import WingsForConditionalGeneration

    def no_allocation(*a, **k):
        raise AssertionError("a model was built before model.path was checked")

    monkeypatch.setattr(WingsForConditionalGeneration, "from_pretrained", no_allocation)
    monkeypatch.setattr(WingsForConditionalGeneration, "__init__", no_allocation)
    line = assert_refused(wings(capsys, *train_args(plain_llm_dir(), train_data(), tmp_path / "run")), "train",
                          "model.path", "plain qwen2 language model", "not a Wings model", "wings init-model")
    assert "--llm" in line and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# convert-official: never over its inputs; OUT replaced only with --overwrite, atomically.


@pytest.fixture(scope="module")
def release(tiny_tokenizer, tmp_path_factory):
    """The tiny release of test_convert_official (llm/, vision/, src/ under one folder)."""
    from test_convert_official import build_release

    root = tmp_path_factory.mktemp("official")
    build_release(tiny_tokenizer, root)
    return root


def convert(src, out, llm, vision, *extra):
    return ["convert-official", src, out, "--llm", llm, "--vision", vision, *extra]


CONVERT_CASES = {
    "out_is_src": (lambda r, t: convert(t / "src", t / "src", r / "llm", r / "vision", "--overwrite"),
                   "is the SRC_DIR"),
    "out_contains_src": (lambda r, t: convert(t / "src", t, r / "llm", r / "vision", "--overwrite"),
                         "contains the SRC_DIR"),
    "out_inside_src": (lambda r, t: convert(t / "src", t / "src" / "converted", r / "llm", r / "vision"),
                       "inside the SRC_DIR"),
    "out_is_llm": (lambda r, t: convert(t / "src", t / "llm", t / "llm", r / "vision", "--overwrite"), "is the --llm"),
    "out_contains_vision": (lambda r, t: convert(t / "src", t / "v", r / "llm", t / "v" / "vision", "--overwrite"),
                            "contains the --vision"),
    "out_exists": (lambda r, t: convert(t / "src", _nonempty(t / "out"), r / "llm", r / "vision"), "--overwrite"),
    "out_is_a_file": (lambda r, t: convert(t / "src", _file(t / "out"), r / "llm", r / "vision"), "is a file"),
    "src_missing": (lambda r, t: convert(t / "nope", t / "out", r / "llm", r / "vision"), "does not exist"),
    "src_is_a_file": (lambda r, t: convert(_file(t / "src.bin"), t / "out", r / "llm", r / "vision"),
                      "not a directory"),
    "src_latin1_index": (lambda r, t: convert(_damage_src(t, "latin1_index"), t / "out", r / "llm", r / "vision"),
                         "not UTF-8"),
    "src_index_not_json": (lambda r, t: convert(_damage_src(t, "index_not_json"), t / "out", r / "llm",
                                                r / "vision"), "not valid JSON"),
    "src_truncated_shard": (lambda r, t: convert(_damage_src(t, "truncated"), t / "out", r / "llm", r / "vision"),
                            "truncated"),
    "src_latin1_config": (lambda r, t: convert(_damage_src(t, "latin1_config"), t / "out", r / "llm", r / "vision"),
                          "not UTF-8"),
    "llm_is_the_vision_encoder": (lambda r, t: convert(t / "src", t / "out", r / "vision", r / "vision"),
                                  "not a causal"),
}


def _nonempty(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("mine")
    return path


def _damage_src(t: Path, damage: str) -> Path:
    src = t / "src"
    index = src / "model.safetensors.index.json"
    if damage == "latin1_index":
        latin1(index, index.read_text().replace("}", ', "caf\u00e9": 1}', 1))
    elif damage == "index_not_json":
        index.write_text("{weight_map")
    elif damage == "truncated":
        truncate(sorted(src.glob("*.safetensors"))[0])
    elif damage == "latin1_config":
        latin1(src / "config.json", '{"lora_dim": 8, "caf\u00e9": 1}')
    return src


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_official_refuses_and_destroys_nothing(release, tmp_path, capsys, case):
    copy_dir(release / "src", tmp_path / "src")
    copy_dir(release / "llm", tmp_path / "llm")
    build, needle = CONVERT_CASES[case]
    args = build(release, tmp_path)
    if case == "out_contains_vision":
        copy_dir(release / "vision", tmp_path / "v" / "vision")
    # the release, the LLM, the vision encoder: all still there, unchanged
    assert_refused_untouched(capsys, tmp_path, args, "convert-official", needle)


def test_convert_official_full_disk_keeps_the_previous_output(release, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert_ok(wings(capsys, *convert(release / "src", out, release / "llm", release / "vision")))
    before = snapshot(out)
    enospc_midway(monkeypatch)
    assert_refused(wings(capsys, *convert(release / "src", out, release / "llm", release / "vision", "--overwrite")),
                   "convert-official", "no space left")
    assert snapshot(out) == before and not hidden_leftovers(tmp_path)
