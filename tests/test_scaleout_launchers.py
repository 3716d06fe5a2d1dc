"""Launchers and failures, 2 CPU processes (gloo) running `wings train`:

- two torchrun "nodes" on this machine (`--nnodes 2`, c10d rendezvous on 127.0.0.1) form one DDP job: both ranks
  end with identical weights, and the losses equal the single-process run's (same global batch and seed);
- rank 1 SIGKILLed in the middle of saving checkpoint-4: the job ends with torchrun's error naming the rank and
  the signal within a bound (no hang), checkpoint-4 is not taken for complete, and `--resume auto` continues from
  checkpoint-2 to exactly the uninterrupted run's final weights;
- `torchrun --max-restarts 1` and rank 1 SIGKILLed from outside after checkpoint-2: torchrun restarts both
  workers, the stage config's `resume: auto` picks the last complete checkpoint, and the run ends at exactly the
  uninterrupted run's weights.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from scaleout_support import (
    JOB_TIMEOUT,
    STEPS,
    WORKER,
    Job,
    assert_close_losses,
    free_port,
    job_env,
    logged_losses,
    max_abs_diff,
    run_job,
    single_reference,
    torchrun,
    train_args,
    wait_for,
    weights,
    write_alternating,
)
from wings.training.trainer import checkpoints, is_complete_checkpoint, latest_complete_checkpoint

LOSS_RTOL = 1e-6  # against the single-process run (measured: <= 8.2e-8)
# From the signal to the end of the job: torchrun notices a dead worker within --monitor-interval (0.1 s) and stops
# the others; seconds in practice. The bound only tells a hang from a slow machine.
END_AFTER_KILL_S = 120


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_alternating(tmp_path_factory.mktemp("launch_data") / "data.json")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, data, tmp_path_factory):
    """Two torchrun agents, one process each, joined by a c10d rendezvous on 127.0.0.1 (the multi-node launch)."""
    root = tmp_path_factory.mktemp("multinode")
    out, rank_dir = root / "run", root / "ranks"
    rank_dir.mkdir()
    port = free_port()
    env = job_env(root, WINGS_TEST_RANK_DIR=str(rank_dir))
    jobs = []
    try:
        for node in (0, 1):
            cmd = torchrun("--nnodes", "2", "--node_rank", str(node), "--rdzv_backend", "c10d",
                           "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "wings-multinode",
                           str(WORKER), *train_args(tiny_model_dir, data, out), nproc=1, standalone=False)
            jobs.append(Job(cmd, env, root / f"node{node}.log"))
        codes = [job.wait(JOB_TIMEOUT) for job in jobs]
    finally:
        for job in jobs:
            job.stop()
    assert codes == [0, 0], "\n".join(job.text()[-3000:] for job in jobs)
    ranks = [json.loads((rank_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"out": out, "ranks": ranks, "final": weights(out / "final"),
            "losses": logged_losses(out / f"checkpoint-{STEPS}")}


@pytest.mark.slow
def test_two_nodes_form_one_job_with_ranks_in_sync(uninterrupted, tiny_model_dir, tmp_path):
    ranks = uninterrupted["ranks"]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [STEPS, STEPS]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    single = single_reference(tiny_model_dir, tmp_path)
    worst = max(abs(a - b) / b for a, b in zip(uninterrupted["losses"], single["losses"], strict=True))
    print(f"two nodes: max |loss - single| / loss {worst:.1e}; max |w - single| "
          f"{max_abs_diff(uninterrupted['final'], single['final']):.1e}")
    assert_close_losses(uninterrupted["losses"], single["losses"], LOSS_RTOL)


def assert_complete_means_whole(out: Path) -> None:
    """Every checkpoint that resume would take holds every rank's part, and each torch file loads."""
    import torch

    for ckpt in checkpoints(out):
        if is_complete_checkpoint(ckpt):
            for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
                assert (ckpt / name).is_file(), f"{ckpt.name} counts as complete but has no {name}"
            for name in ("optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"):
                torch.load(ckpt / name, weights_only=False)


@pytest.mark.slow
def test_killed_rank_ends_the_job_and_resume_auto_finishes_the_run(uninterrupted, tiny_model_dir, data, tmp_path):
    out, rank_dir = tmp_path / "run", tmp_path / "ranks"
    rank_dir.mkdir()
    env = job_env(tmp_path, WINGS_TEST_RANK_DIR=str(rank_dir), WINGS_TEST_DIE_AT_SAVE="4")
    job = Job(torchrun(str(WORKER), *train_args(tiny_model_dir, data, out)), env, tmp_path / "killed.log")
    try:
        wait_for(lambda: (rank_dir / "died").exists(), job, JOB_TIMEOUT, "SIGKILL of rank 1")
        killed_at = time.monotonic()
        rc = job.wait(END_AFTER_KILL_S)
    finally:
        job.stop()
    log = job.text()
    print(f"killed rank: job ended {time.monotonic() - killed_at:.1f} s after the SIGKILL, exit code {rc}")
    assert rc != 0
    assert "ChildFailedError" in log and "Signal 9 (SIGKILL)" in log, log[-3000:]
    assert (out / "checkpoint-4").is_dir() and not is_complete_checkpoint(out / "checkpoint-4")
    assert latest_complete_checkpoint(out) == out / "checkpoint-2"
    assert not (out / "final").exists()
    assert_complete_means_whole(out)

    resumed = run_job(torchrun(str(WORKER), *train_args(tiny_model_dir, data, out, 1, "--resume", "auto")),
                      job_env(tmp_path), tmp_path / "resumed.log")
    assert "[wings train]" in resumed
    assert logged_losses(out / f"checkpoint-{STEPS}") == uninterrupted["losses"]
    assert max_abs_diff(weights(out / "final"), uninterrupted["final"]) == 0.0


@pytest.mark.slow
def test_torchrun_restart_recovers_from_the_last_checkpoint(uninterrupted, tiny_model_dir, data, tmp_path):
    out, rank_dir = tmp_path / "run", tmp_path / "ranks"
    rank_dir.mkdir()
    cmd = torchrun("--max-restarts", "1", str(WORKER), *train_args(tiny_model_dir, data, out))
    job = Job(cmd, job_env(tmp_path, WINGS_TEST_RANK_DIR=str(rank_dir)), tmp_path / "restart.log")
    try:
        wait_for(lambda: is_complete_checkpoint(out / "checkpoint-2"), job, JOB_TIMEOUT, "checkpoint-2")
        pid = int((rank_dir / "pid_rank1").read_text())
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        rc = job.wait(JOB_TIMEOUT)
    finally:
        job.stop()
    log = job.text()
    assert rc == 0, log[-4000:]
    assert int((rank_dir / "pid_rank1").read_text()) != pid  # a new rank 1 finished the run
    assert log.count("[wings train] stage") == 2, log[-4000:]  # started twice
    print(f"restart: job ended {time.monotonic() - killed_at:.1f} s after the SIGKILL")
    assert logged_losses(out / f"checkpoint-{STEPS}") == uninterrupted["losses"]
    assert max_abs_diff(weights(out / "final"), uninterrupted["final"]) == 0.0
    assert_complete_means_whole(out)
