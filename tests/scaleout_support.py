"""Shared pieces of the scale-out tests: one small training setup, launching torchrun jobs with a hard timeout
(each job in its own process group, killed whole on timeout or failure), and reading what a run left on disk.

Every multi-process run here is 2 CPU processes (gloo) on the tiny model: 16 alternating image / text-only
records, 1 sample per rank (global batch 2), 8 steps (one epoch), a checkpoint every 2 steps, every step logged,
fp32, a high learning rate on every trained group so that each group visibly moves in a few steps. The modality
sampler orders the steps T I I I I T T T (`step_modalities`): text-only steps after image steps, where the
visual learner and the projector get no gradient, and losses after them that show how they were stepped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
WORKER = Path(__file__).resolve().parent / "scaleout_worker.py"
STEPS, SAVE_STEPS = 8, 2
STAGE = "wings_stage2"
TRAINED = {"llm", "projector", "visual_learner", "textual_learner", "router"}  # wings_stage2's groups
# Launch budget per job: two fresh interpreters importing torch + transformers (+ deepspeed) on shared cores.
JOB_TIMEOUT = 420

COMMON = [
    "--max-steps", str(STEPS), "--set", f"train.save_steps={SAVE_STEPS}", "--set", "train.save_total_limit=null",
    "--set", "train.precision=fp32", "--set", "train.report_to=[]", "--set", "train.use_cpu=true",
    "--set", "train.gradient_checkpointing=false", "--set", "train.grad_accum=1", "--set", "train.logging_steps=1",
    "--set", "train.warmup_ratio=0", "--set", "data.max_length=128", "--set", "data.group_by_modality=true",
    *[arg for g in sorted(TRAINED) for arg in ("--set", f"groups.{g}.lr=1e-3")],
]


def write_alternating(path: Path, n: int = 16) -> Path:
    """n records: even ones ask about a real easy-vqa image, odd ones are text-only arithmetic."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    image_paths = easy_vqa.get_train_image_paths()
    records = []
    for i in range(n):
        if i % 2 == 0:
            records.append({"id": f"img{i}", "image": image_paths[image_ids[i]],
                            "conversations": [{"from": "human", "value": f"<image>\n{questions[i]}"},
                                              {"from": "gpt", "value": answers[i]}]})
        else:
            records.append({"id": f"txt{i}", "conversations": [{"from": "human", "value": f"What is {i} + 1?"},
                                                               {"from": "gpt", "value": str(i + 1)}]})
    path.write_text(json.dumps(records))
    return path


def train_args(model_dir: Path, data: Path, out: Path, batch_size: int = 1, *extra: str) -> list[str]:
    return ["train", STAGE, "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--batch-size", str(batch_size), *COMMON, *extra]


_SINGLE: dict[str, dict] = {}


def single_reference(model_dir: Path, root: Path) -> dict:
    """The reference every engine is compared with: one process, batch 2 (= 2 ranks x 1), same seed and data.
    Run once per session (in this process) and shared by the test modules."""
    if str(model_dir) not in _SINGLE:
        from wings.cli import main as wings_main

        out = root / "single"
        assert wings_main(train_args(model_dir, write_alternating(root / "data.json"), out, 2)) == 0
        _SINGLE[str(model_dir)] = {"losses": logged_losses(out / f"checkpoint-{STEPS}"),
                                   "final": weights(out / "final")}
    return _SINGLE[str(model_dir)]


def step_modalities(model_dir: Path, data: Path, batch_size: int = 1, world: int = 2, seed: int = 42) -> str:
    """'I' / 'T' per optimizer step of the first epoch, as the Trainer's modality sampler orders them."""
    from transformers import AutoProcessor

    from wings.data import build_dataset, modality_length_grouped_indices

    ds = build_dataset(data, AutoProcessor.from_pretrained(model_dir), max_length=128, progress=False)
    order = modality_length_grouped_indices(ds.lengths, ds.is_multimodal, batch_size, world,
                                            torch.Generator().manual_seed(seed))  # the Trainer's seed + epoch 0
    return "".join("I" if ds.is_multimodal[order[i]] else "T" for i in range(0, len(order), batch_size * world))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(tmp_path)}  # torchelastic leaves its scratch dirs in TMPDIR
    env.pop("WINGS_TEST_FSDP_ON_CPU", None)
    env.update(extra)
    return env


def torchrun(*args: str, nproc: int = 2, standalone: bool = True) -> list[str]:
    launch = ["--standalone"] if standalone else []
    return [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node", str(nproc), *args]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc). torchrun starts each worker in a session of its own, so killing
    torchrun's process group would leave the workers running, orphaned."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Job:
    """A launched command in its own session; `stop()` kills it and every process below it (torchrun's workers
    included, which live in sessions of their own)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        self.started = time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            tail = self.text()[-4000:]
            raise AssertionError(f"job still running after {timeout:.0f} s (hung?); log:\n{tail}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            for pid in descendants(self.proc.pid):  # before torchrun dies and they are re-parented
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self._out.close()

    def text(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")


def run_job(cmd: list[str], env: dict[str, str], log: Path, timeout: float = JOB_TIMEOUT) -> str:
    """Run to the end; fail the test (with the log's tail) on a non-zero exit or a timeout."""
    job = Job(cmd, env, log)
    try:
        rc = job.wait(timeout)
    finally:
        job.stop()
    text = job.text()
    assert rc == 0, f"exit code {rc}:\n{text[-6000:]}"
    return text


def wait_for(predicate, job: Job, timeout: float, what: str, poll: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if job.proc.poll() is not None:
            raise AssertionError(f"job ended (rc {job.proc.returncode}) before {what}:\n{job.text()[-4000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"no {what} after {timeout:.0f} s:\n{job.text()[-4000:]}")
        time.sleep(poll)


def logged_losses(checkpoint: Path) -> list[float]:
    """The per-step training losses a checkpoint's trainer_state.json holds (its whole history)."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


TIED = ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight")


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model. DeepSpeed's state dict holds clones, so HF cannot see that the tiny model's
    lm_head is tied to the embeddings and saves it too: such an exact copy is dropped, as HF drops it elsewhere."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    head, embed = TIED
    if head in tensors and embed in tensors and torch.equal(tensors[head], tensors[embed]):
        del tensors[head]
    return tensors


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_close_losses(got: list[float], want: list[float], rtol: float) -> None:
    assert len(got) == len(want), (got, want)
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))
    assert worst <= rtol, f"losses differ by {worst:.2e} (relative) > {rtol:.0e}:\n{got}\n{want}"
