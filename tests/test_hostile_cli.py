"""The `wings` process as users see it: failures print one `wings <cmd>: error:` line and no traceback on stderr
(checked in real subprocesses), a really full or read-only disk (a tiny tmpfs, or a file-size limit) leaves no
half-written model, and the smaller commands (smoke, demo, iit) refuse bad flags clearly."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostile_support import (
    TRACEBACK,
    assert_refused,
    plain_llm_dir,
    train_args,
    train_data,
    wings,
    write_jsonl,
)

SRC = Path(__file__).resolve().parents[1] / "src"


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def wings_process(*args, prefix: tuple = (), preexec=None) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-m", "wings.cli", *map(str, args)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_failures_print_one_line_and_no_traceback(tmp_path, tiny_model_dir):
    """Several kinds of failure, each in its own process (run side by side to save time)."""
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "model.safetensors").write_bytes(b"\x00" * 16)
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"id": "one", "question": "q?", "options": ["a"], "answer": 0}])
    cases = {
        "eval": (["eval", tiny_model_dir, "--task", mc, "--out", tmp_path / "r.json"], "at least 2 options"),
        "convert-official": (["convert-official", tmp_path / "release", tmp_path / "release", "--llm", plain_llm_dir(),
                              "--vision", plain_llm_dir(), "--overwrite"], "is the SRC_DIR"),
    }
    procs = {cmd: wings_process(*args) for cmd, (args, _) in cases.items()}
    for cmd, proc in procs.items():
        rc, err = finish(proc)
        assert TRACEBACK not in err, err
        lines = [line for line in err.splitlines() if ": error:" in line]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"wings {cmd}: error:"), (cmd, rc, err)
        assert cases[cmd][1] in lines[0], lines[0]
    assert (tmp_path / "release" / "model.safetensors").read_bytes() == b"\x00" * 16  # SRC untouched


def limit_file_size(max_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def _can_mount_in_a_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("disk", ["full", "read_only"])
def test_a_really_full_or_read_only_disk_leaves_no_model(tmp_path, disk):
    """A 512 KiB tmpfs (the weights need ~1 MiB: ENOSPC mid-write) or a read-only mount, in a private mount
    namespace; where that is not possible, a file-size limit (EFBIG for any write past 256 KiB) stands in for the
    full disk. The command fails with one line and leaves nothing on that disk (no config.json without weights)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    command = [sys.executable, "-m", "wings.cli", "init-model", "--preset", "tiny", "--out", str(mnt / "m")]
    if _can_mount_in_a_namespace():
        options = "size=512k" if disk == "full" else "size=4m,ro"
        script = f'mount -t tmpfs -o {options} tmpfs "{mnt}" && "$@"; rc=$?; echo LEFT:; ls -A "{mnt}"; exit $rc'
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], env=env(), capture_output=True,
                              text=True, timeout=300)
        left = proc.stdout.split("LEFT:", 1)[1].split()
        expected = ["no space left"] if disk == "full" else ["read-only"]
    elif disk == "full":
        proc = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300,
                              preexec_fn=limit_file_size(256 << 10))
        left = [p.name for p in mnt.iterdir()]
        expected = ["too large", "os error 27"]
    else:
        pytest.skip("a read-only disk needs `unshare -rm` and tmpfs mounts (Linux)")
    assert proc.returncode == 2 and TRACEBACK not in proc.stderr, proc.stderr
    line = [x for x in proc.stderr.splitlines() if ": error:" in x][0]
    assert line.startswith("wings init-model: error:") and any(e in line.lower() for e in expected), line
    assert left == []  # nothing left on that disk


# ---------------------------------------------------------------------------------------------------------------
# Smaller commands and flags


@pytest.mark.parametrize(("args", "command", "needles"), [
    (["smoke", "--max-new-tokens", "0"], "smoke", ["--max-new-tokens", "positive"]),
    (["demo", "--stage2-steps", "0"], "demo", ["--stage2-steps", "positive"]),
    (["demo", "--quick", "--out", "FILE"], "demo", ["FILE"]),
    (["train"], "train", ["config"]),
    (["iit"], "iit", ["ACTION"]),
    (["nonsense"], None, ["invalid choice"]),
], ids=["smoke_zero_tokens", "demo_zero_steps", "demo_out_is_a_file", "train_without_config", "iit_without_action",
        "unknown_command"])
def test_small_commands_refuse_bad_flags(tmp_path, capsys, args, command, needles):
    (tmp_path / "FILE").write_text("not a folder")
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    outcome = wings(capsys, *args)
    if command is None:
        assert outcome.rc == 2 and TRACEBACK not in outcome.err and "invalid choice" in outcome.err
        return
    assert_refused(outcome, command, *needles)
    assert (tmp_path / "FILE").read_text() == "not a folder"


def test_run_identity_is_written_for_every_fresh_run(tmp_path, capsys, tiny_model_dir):
    """The file a later resume is checked against (settings, data and model fingerprints)."""
    assert wings(capsys, *train_args(tiny_model_dir, train_data(), tmp_path / "run", steps=1)).rc == 0
    identity = json.loads((tmp_path / "run" / "run_identity.json").read_text())
    assert identity["settings"]["train.max_steps"] == 1 and identity["data_sha256"]["data.path"]
    assert len(identity["model_fingerprint"]) == 64
