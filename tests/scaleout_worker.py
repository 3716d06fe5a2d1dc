"""torchrun entry point of the scale-out tests: the `wings train` CLI (`wings.cli.main`) plus test-only hooks,
each switched on by an environment variable so that a plain launch is exactly `wings train`.

    WINGS_TEST_RANK_DIR=DIR      each rank writes DIR/pid_rank{R} at start and DIR/rank{R}.json at the end of
                                 training (sha256 of its full parameters, world size): replicas must agree
    WINGS_TEST_DIE_AT_SAVE=N     rank 1 SIGKILLs itself when checkpoint-N's save reaches its RNG state (after
                                 its ZeRO/FSDP shards, before the file that marks the checkpoint complete), once:
                                 DIR/died marks that it happened, so a restarted rank trains on
    WINGS_TEST_FSDP_ON_CPU=1     let accelerate run FSDP on CPU processes (gloo). accelerate 1.15 enables FSDP only
                                 for GPU-type devices and silently drops the plugin on CPU (the run would be DDP);
                                 this lifts that one check so the FSDP code path (sharding, DCP checkpoints, the
                                 full-state-dict save) runs here. torch's FSDP2 itself runs on gloo.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path


def enable_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def digest(model) -> str:
    """sha256 of this rank's parameters (under FSDP: of its shards, which differ between ranks by design)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
        h.update(name.encode())
        h.update(local.float().cpu().numpy().tobytes())
    return h.hexdigest()


def record_ranks(rank_dir: Path) -> None:
    import torch
    from transformers import TrainerCallback

    import wings.training

    rank = int(os.environ["RANK"])
    (rank_dir / f"pid_rank{rank}").write_text(str(os.getpid()))

    class RankRecord(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            (rank_dir / f"rank{rank}.json").write_text(json.dumps({
                "digest": digest(model), "world": torch.distributed.get_world_size(), "step": state.global_step}))

    original = wings.training.train

    def train(config, *args, callbacks=None, **kwargs):
        return original(config, *args, callbacks=[RankRecord(), *(callbacks or [])], **kwargs)

    wings.training.train = train  # the CLI imports `train` from wings.training when it runs


def die_at_save(step: int, marker: Path) -> None:
    from wings.training.trainer import WingsTrainer

    original = WingsTrainer._save_rng_state

    def save_rng_state(self, output_dir):
        if int(os.environ["RANK"]) == 1 and self.state.global_step == step and not marker.exists():
            marker.write_text(output_dir)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)

    WingsTrainer._save_rng_state = save_rng_state


if __name__ == "__main__":
    if os.environ.get("WINGS_TEST_FSDP_ON_CPU") == "1":
        enable_fsdp_on_cpu()
    if os.environ.get("WINGS_TEST_RANK_DIR"):
        record_ranks(Path(os.environ["WINGS_TEST_RANK_DIR"]))
    if os.environ.get("WINGS_TEST_DIE_AT_SAVE"):
        die_at_save(int(os.environ["WINGS_TEST_DIE_AT_SAVE"]), Path(os.environ["WINGS_TEST_RANK_DIR"]) / "died")
    from wings.cli import main

    sys.exit(main(sys.argv[1:]))
