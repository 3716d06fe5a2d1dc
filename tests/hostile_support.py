"""Helpers for the hostile-input suites (tests/test_hostile_*.py; no tests here): run `wings` in-process and check
that it failed clearly (exit 2, one `wings <cmd>: error:` line naming the thing, no traceback) or succeeded;
build hostile files (image bombs, non-UTF-8 text, truncated weights); snapshot folders to prove nothing changed."""

from __future__ import annotations

import atexit
import errno
import functools
import hashlib
import json
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import easy_vqa
from PIL import Image

from wings.cli import main

TRACEBACK = "Traceback (most recent call last)"
# Small, fast, deterministic training runs (CPU, fp32, no logging integrations, short sequences).
FAST = ["train.precision=fp32", "train.report_to=[]", "train.use_cpu=true", "train.gradient_checkpointing=false",
        "train.logging_steps=1", "train.grad_accum=1", "train.warmup_ratio=0", "data.max_length=128",
        "train.save_total_limit=null", "train.batch_size=4"]


@dataclass
class Outcome:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if ": error:" in line]


def wings(capsys, *args) -> Outcome:
    """Run `wings ARGS` in-process; an exception that escapes `main` fails the test with its traceback."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as stop:  # argparse's own errors (usage + `wings <cmd>: error: argument ...`, exit 2)
        rc = stop.code
    captured = capsys.readouterr()
    return Outcome(rc, captured.out, captured.err)


def assert_refused(outcome: Outcome, command: str, *needles: str) -> str:
    """Exit 2 and exactly one line `wings <command>: error: ...` that contains every needle; no traceback."""
    assert TRACEBACK not in outcome.err, outcome.err
    assert outcome.rc == 2, (outcome.rc, outcome.out[-2000:], outcome.err[-2000:])
    lines = outcome.error_lines
    assert len(lines) == 1, outcome.err
    line = lines[0]
    assert line.startswith(f"wings {command}: error:"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def assert_refused_untouched(capsys, root: Path, args: list, command: str, *needles: str) -> str:
    """Run `wings *args`; it must be refused (`assert_refused`) and leave every file under `root` as it was."""
    before = snapshot(root)
    line = assert_refused(wings(capsys, *args), command, *needles)
    assert snapshot(root) == before, "a refused command changed files"
    return line


def enospc_midway(monkeypatch) -> None:
    """The disk fills up while weights are written: half the safetensors file lands, then ENOSPC."""
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def partial(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        truncate(Path(filename))
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(mu, "safe_save_file", partial)


def assert_ok(outcome: Outcome) -> Outcome:
    assert TRACEBACK not in outcome.err, outcome.err
    assert outcome.rc == 0, (outcome.rc, outcome.err[-3000:])
    return outcome


def train_args(model, data, out, *extra, config: str = "wings_stage1", steps: int = 2) -> list:
    sets = [x for s in FAST for x in ("--set", s)]
    return ["train", config, "--model", model, "--data", data, "--output-dir", out, "--max-steps", steps, *sets,
            *extra]


# ---------------------------------------------------------------------------------------------------------------
# Hostile files


def strip_png(path: Path, width: int = 100_000) -> Path:
    """A valid PNG of width x 1 pixels: a few hundred bytes, 10^10 pixels once padded to a square."""
    Image.new("L", (width, 1)).save(path, format="PNG")
    return path


def header_bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A PNG whose header claims width x height (400 Mpx here) with almost no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def latin1(path: Path, text: str = "caf\u00e9: 1\n") -> Path:
    path.write_bytes(text.encode("latin-1"))
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (dirs included by name): equal snapshots, nothing changed."""
    root = Path(root)
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def hidden_leftovers(root: Path) -> list[Path]:
    """Temp files or folders an interrupted write could leave behind."""
    return [p for p in Path(root).rglob(".*") if p.name.endswith(".tmp") or ".tmp" in p.name or ".old" in p.name]


# ---------------------------------------------------------------------------------------------------------------
# Shared inputs, built once per test session (kept in one temp folder removed at exit)


@functools.cache
def workspace() -> Path:
    root = Path(tempfile.mkdtemp(prefix="wings_hostile_"))
    atexit.register(shutil.rmtree, root, True)
    return root


def llava_records(n: int, offset: int = 0) -> list[dict]:
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    return [{"id": f"img{k}", "image": paths[image_ids[k]],
             "conversations": [{"from": "human", "value": f"<image>\n{questions[k]}"},
                               {"from": "gpt", "value": answers[k]}]} for k in range(offset, offset + n)]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@functools.cache
def train_data() -> Path:
    return write_json(workspace() / "data" / "train.json", llava_records(8))


@functools.cache
def other_train_data() -> Path:
    return write_json(workspace() / "data" / "other.json", llava_records(8, offset=100))


@functools.cache
def plain_llm_dir() -> Path:
    """A plain HF causal LM directory (qwen2, with tokenizer): what `--llm` takes and `--model` must refuse."""
    from wings.builder import build_tiny

    model, processor = build_tiny(mode="llava")
    out = workspace() / "plain_llm"
    model.language_model.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    return out


@functools.cache
def vision_dir() -> Path:
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    out = workspace() / "vision"
    SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4)).save_pretrained(out)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def image_path(k: int = 0) -> str:
    return easy_vqa.get_test_image_paths()[k]
