"""How `wings` starts (issue 21, classes 1 and 4).

Multi-process launches: under a launcher that starts N > 1 processes (torchrun, accelerate launch, mpirun), a run is
one distributed job or is refused; it is never N single-process runs writing one output dir. `wings train` picks the
CPU path by itself on a machine without a GPU (the torchrun run itself is tests/test_training_ddp.py); every other
command refuses such a launch. These tests set the launcher's variables in this process: the checks run before any
process group is formed.

Start-up: the `wings` console script answers `--help` and argument errors without importing torch or transformers,
still registers the Auto classes before a command runs, and no command that does not use DeepSpeed imports it
(DeepSpeed's import prints `Setting accelerator to CPU` on machines without a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hostile_support import FAST, assert_refused, assert_refused_untouched, image_path, train_data, wings, write_jsonl

SRC = Path(__file__).resolve().parents[1] / "src"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                 "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def launched(monkeypatch):
    """Set a launcher's variables for one test (and nothing else of a launcher's)."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)

    def launch(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return launch


OK_TASK = {"id": "ok", "question": "What is 1 + 1?", "options": ["2", "3"], "answer": "2"}

# (command as the error names it, argv builder (tmp, model) -> argv): valid commands, each of which would run whole
# in every process
SINGLE_PROCESS = [
    ("eval", lambda t, m: ["eval", m, "--task", write_jsonl(t / "t.jsonl", [OK_TASK]), "--out", t / "r.json"]),
    ("chat", lambda t, m: ["chat", m, "hi"]),
    ("serve", lambda t, m: ["serve", m, "--port", "0"]),
    ("init-model", lambda t, m: ["init-model", "--preset", "tiny", "--out", t / "new"]),
    ("laws", lambda t, m: ["laws", m, "--data", write_jsonl(t / "t.jsonl", [OK_TASK]), "--out", t / "o"]),
    ("iit build", lambda t, m: ["iit", "build", "--text-pool", t / "a.jsonl", "--mm-pool", t / "b.jsonl", "--out",
                                t / "o.jsonl"]),
    ("smoke", lambda t, m: ["smoke"]),
    ("demo", lambda t, m: ["demo", "--out", t / "demo"]),
]


@pytest.mark.parametrize(("command", "build"), SINGLE_PROCESS, ids=[c[0] for c in SINGLE_PROCESS])
def test_single_process_commands_refuse_a_multi_process_launch(tmp_path, capsys, launched, tiny_model_dir, command,
                                                                build):
    launched(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    assert_refused_untouched(capsys, tmp_path, build(tmp_path, tiny_model_dir), command,
                             "a launcher started 2 (WORLD_SIZE=2)", "without torchrun")


def test_an_mpi_launch_counts_too(tmp_path, capsys, launched, tiny_model_dir):
    launched(OMPI_COMM_WORLD_SIZE="4")
    assert_refused(wings(capsys, "chat", tiny_model_dir, "hi"), "chat", "started 4 (OMPI_COMM_WORLD_SIZE=4)")


def test_a_launcher_variable_that_is_not_a_number_is_named(tmp_path, capsys, launched, tiny_model_dir):
    launched(WORLD_SIZE="two")
    assert_refused(wings(capsys, "chat", tiny_model_dir, "hi"), "chat", "WORLD_SIZE='two'", "not a process count")


def config(tmp_path, *overrides: str):
    from wings.training import load_config

    return load_config(CONFIGS / "wings_stage2.yaml", [*FAST, f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU choice is made on machines without a GPU")
def test_train_under_a_launcher_without_a_gpu_chooses_the_cpu_path_and_says_so(tmp_path, launched):
    from wings.training.engines import resolve_launch

    cfg = config(tmp_path, "train.use_cpu=false")
    assert resolve_launch(cfg) is None and cfg.train.use_cpu is False  # one process: nothing changes
    launched(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    note = resolve_launch(cfg)
    assert cfg.train.use_cpu is True
    assert "2 processes on a machine without a CUDA GPU" in note and "train.use_cpu=true, gloo" in note


@pytest.mark.skipif(torch.cuda.is_available(), reason="nccl is refused where there is no GPU")
def test_train_with_nccl_and_no_gpu_is_refused_before_anything_is_written(tmp_path, capsys, launched,
                                                                          tiny_model_dir):
    launched(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    args = ["train", "wings_stage2", "--model", tiny_model_dir, "--data", train_data(), "--output-dir",
            tmp_path / "run", "--max-steps", "1", *[a for s in FAST for a in ("--set", s)],
            "--set", "train.ddp_backend=nccl"]
    assert_refused_untouched(capsys, tmp_path, args, "train", "train.ddp_backend=nccl needs CUDA GPUs")


def test_more_processes_than_gpus_on_a_machine_is_refused(tmp_path, launched, monkeypatch):
    from wings.training.engines import resolve_launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    launched(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    with pytest.raises(ValueError, match=r"2 processes were launched on this machine but it has 1 CUDA GPU"):
        resolve_launch(config(tmp_path, "train.use_cpu=false"))
    cfg = config(tmp_path, "train.use_cpu=true")
    assert resolve_launch(cfg) is None  # CPU processes: any number


def test_a_job_the_trainer_did_not_form_is_refused(launched):
    """The last guard, after the Trainer's arguments exist: N launched processes, a job of 1 each."""
    from wings.training.engines import check_world_size

    check_world_size(1)  # no launcher
    launched(WORLD_SIZE="2")
    check_world_size(2)
    with pytest.raises(ValueError, match="started 2 processes but the trainer set up a job of 1"):
        check_world_size(1)


# ---------------------------------------------------------------------------------------------------------------
# Start-up: the console script, the deferred `import wings`, DeepSpeed kept out


def env() -> dict:
    drop = set(LAUNCHER_VARS) | {"PYTHONPATH"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# Reports, at exit, which heavy packages the process imported; then runs the console script's entry point.
WATCH = textwrap.dedent("""
    import atexit, json, sys
    heavy = ("torch", "transformers", "deepspeed", "numpy", "PIL")
    atexit.register(lambda: print("MODULES " + json.dumps([m for m in heavy if m in sys.modules]), file=sys.stderr))
    from wings_entry import main
""")


def run_watched(body: str, *args, timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run([sys.executable, "-c", WATCH + body, *map(str, args)], env=env(), capture_output=True,
                          text=True, timeout=timeout)
    line = [x for x in proc.stderr.splitlines() if x.startswith("MODULES ")][-1]
    return proc, json.loads(line.split(" ", 1)[1])


def probe(*args) -> tuple[int, str, list[str]]:
    proc, heavy = run_watched("sys.exit(main(sys.argv[1:]))", *args)
    return proc.returncode, proc.stdout + proc.stderr, heavy


@pytest.mark.parametrize(("args", "rc", "words"), [
    (["--help"], 0, "Wings multimodal LLMs"),
    (["train", "--help"], 0, "--max-steps"),
    (["trian"], 2, "invalid choice: 'trian'"),
    (["eval"], 2, "the following arguments are required"),
    (["chat", "m", "--max-new-tokens", "0"], 2, "must be a positive integer"),
], ids=["help", "train_help", "typo", "missing_args", "bad_number"])
def test_help_and_argument_errors_answer_without_importing_torch(args, rc, words):
    code, text, heavy = probe(*args)
    assert code == rc and words in text, text[-2000:]
    assert heavy == [], f"`wings {' '.join(args)}` imported {heavy}"


def test_the_console_script_is_the_light_entry_point():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "wings"]
    assert script.value == "wings_entry:main", "reinstall (pip install -e .) so the `wings` script is regenerated"


def test_commands_run_with_the_auto_classes_registered_and_without_deepspeed(tmp_path, tiny_model_dir):
    """init-model (saves), chat (loads through AutoModelForImageTextToText: needs the registration that `import wings`
    does, here deferred until after parsing) and a one-step training run (the Trainer's start), in one process."""
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "i", "image": image_path(0), "conversations": [{"from": "human", "value": "<image>\nshape?"},
                                                              {"from": "gpt", "value": "circle"}]}])
    script = textwrap.dedent(f"""
        codes = [main(["init-model", "--preset", "tiny", "--out", {str(tmp_path / "m")!r}]),
                 main(["chat", {str(tmp_path / "m")!r}, "hi", "--max-new-tokens", "2", "--device", "cpu"]),
                 main(["train", "wings_stage2", "--model", {str(tmp_path / "m")!r}, "--data", {str(data)!r},
                       "--output-dir", {str(tmp_path / "run")!r}, "--max-steps", "1",
                       *[a for s in {FAST!r} for a in ("--set", s)]])]
        sys.exit(max(codes))
    """)
    proc, heavy = run_watched(script, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and "Setting accelerator" not in output, output[-3000:]
    assert "torch" in heavy and "deepspeed" not in heavy
    assert (tmp_path / "run" / "final" / "config.json").is_file()
