"""Two-process DDP (torchrun, gloo on CPU): trains, and both ranks end with identical weights.

Samples alternate image / text-only and are read in order with one per device, so every step has an image
batch on rank 0 and a text-only batch on rank 1: the visual learner and the projector are unused on rank 1,
which must not break DDP with find_unused_parameters=False.

It runs `wings train` as torchrun runs it (`torchrun --nproc_per_node 2 -m wings.cli train ...`). On a machine without
CUDA it leaves `train.use_cpu` unset, as a user who forgot it would: the two processes must still form one job on the
CPU (gloo) and say so, never train as two separate runs into one output dir (issue 21).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from scaleout_support import job_env, run_job, torchrun, write_alternating

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from transformers import TrainerCallback
    import wings.training
    from wings.cli import main

    out = sys.argv[1]
    rank = int(os.environ["RANK"])

    def digest(model):
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            h.update(name.encode()); h.update(p.detach().float().numpy().tobytes())
        return h.hexdigest()

    class Hashes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.begin = digest(model)
        def on_train_end(self, args, state, control, model=None, **kw):
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
                json.dump({"begin": self.begin, "end": digest(model), "losses": losses,
                           "world": torch.distributed.get_world_size()}, f)

    original = wings.training.train  # the CLI imports it from wings.training when the command runs

    def train(config, *args, callbacks=None, **kwargs):
        return original(config, *args, callbacks=[Hashes(), *(callbacks or [])], **kwargs)

    wings.training.train = train
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_torchrun_two_process_ddp_keeps_ranks_identical(tiny_model_dir, tmp_path):
    data = write_alternating(tmp_path / "data.json", 8)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    cpu_only = not torch.cuda.is_available()
    overrides = [
        "train.save_steps=100", "train.precision=fp32", "train.report_to=[]", "train.gradient_checkpointing=false",
        "train.logging_steps=1", "train.warmup_ratio=0", "data.group_by_modality=false", "data.max_length=128",
        "train.extra_args.train_sampling_strategy=sequential", "groups.llm.lr=1e-3", "groups.projector.lr=1e-3",
        *([] if cpu_only else ["train.use_cpu=true", "train.ddp_backend=gloo"]),  # (a GPU machine: stay on CPU)
    ]
    cmd = torchrun(str(script), str(tmp_path), "train", str(CONFIGS / "wings_stage2.yaml"), "--model",
                   str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "3",
                   "--batch-size", "1", *[arg for o in overrides for arg in ("--set", o)])
    # A DDP desync (e.g. a parameter without a gradient on one rank) hangs rather than fails: bound it (the job,
    # torchrun's workers included, is killed at the timeout).
    log = run_job(cmd, job_env(tmp_path), tmp_path / "ddp.log", timeout=300)
    assert "(ddp, 2 process(es))" in log, log[-3000:]
    if cpu_only:
        assert "without a CUDA GPU: training as one distributed job of 2 CPU processes" in log, log[-3000:]
        assert "train.use_cpu=true" in log
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["begin"] == ranks[1]["begin"]
    assert ranks[0]["end"] == ranks[1]["end"]  # DDP kept the replicas in sync
    assert ranks[0]["end"] != ranks[0]["begin"]  # and they trained
    assert len(ranks[0]["losses"]) == 3
    assert (tmp_path / "run" / "final" / "config.json").is_file()
