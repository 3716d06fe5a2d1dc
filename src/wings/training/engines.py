"""Scale-out engines (DDP, DeepSpeed ZeRO, FSDP) as the HF Trainer runs them: what a config asks for, the checks
that turn a silent misconfiguration into a clear error, and the one FSDP setting the final save needs.

    ddp        torchrun / accelerate launch with neither `train.deepspeed` nor `train.fsdp`
    zero2/3    `train.deepspeed: configs/deepspeed/zero{2,3}.json`
    fsdp       `train.fsdp: configs/accelerate/fsdp.json` (an HF `fsdp_config`), or `accelerate launch
               --config_file configs/accelerate/fsdp.yaml` (which sets ACCELERATE_USE_FSDP for the workers)

ZeRO-3 keeps every parameter's reduced gradient in one flat buffer and overwrites a parameter's slice only when
that parameter gets a gradient, so a parameter a step skips (the visual learner and the projector on a text-only
step) would be stepped again with the gradient of the last step that used it; `FreshZero3Gradients` zeroes the
buffer before each optimizer step, which gives skipped parameters the zero gradient DDP gives them (`anchor()`).

ZeRO-3 and FSDP gather a module's weights collectively when the module runs. A rank whose batch has no image
skips the vision tower, so under them every rank must see the same modality at each step: the modality sampler
(`data.group_by_modality: true`) guarantees that, and `check_engine` refuses a sharded run without it (it would
hang or fail with a size mismatch rather than train).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..launch_env import launched_world_size
from .config import TrainConfig


def resolve_launch(config: TrainConfig) -> str | None:
    """Make a multi-process launch one distributed job, or refuse it: never N independent single-process runs
    writing one output_dir. Returns a note for the log when it chose something the config did not say.

    accelerate forms a process group only on GPUs (and other accelerators) unless told to use the CPU: on a
    machine without one, `torchrun --nproc_per_node N` without `train.use_cpu` would give N separate trainings.
    There the CPU path (gloo) is chosen here. `launch.train` checks the outcome once the Trainer's arguments exist.
    """
    import torch

    world = launched_world_size()
    if world < 2:
        return None
    t = config.train
    xpu = getattr(torch, "xpu", None)
    accelerator = torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())
    note = None
    if not t.use_cpu and not accelerator:
        t.use_cpu = True
        note = (f"launched as {world} processes on a machine without a CUDA GPU: training as one distributed job of "
                f"{world} CPU processes (train.use_cpu=true, {t.ddp_backend or 'gloo'})")
    if t.ddp_backend == "nccl" and (t.use_cpu or not torch.cuda.is_available()):
        where = "train.use_cpu is true" if torch.cuda.is_available() else "this machine has no CUDA GPU"
        raise ValueError(f"train.ddp_backend=nccl needs CUDA GPUs and {where}: use train.ddp_backend=gloo (or "
                         "leave it unset)")
    if not t.use_cpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or 0) or int(os.environ.get("LOCAL_RANK") or 0) + 1
        gpus = torch.cuda.device_count()
        if local > gpus:
            raise ValueError(f"{local} processes were launched on this machine but it has {gpus} CUDA GPU(s), and "
                             f"each process trains on a GPU of its own: launch at most {gpus} per machine "
                             f"(torchrun --nproc_per_node {gpus}), or train on CPU processes (train.use_cpu=true)")
    return note


def check_world_size(trainer_world_size: int) -> None:
    """The Trainer's view of the job must be the launcher's: anything else would be several separate runs."""
    world = launched_world_size()
    if world > 1 and trainer_world_size != world:
        raise ValueError(
            f"the launcher started {world} processes but the trainer set up a job of {trainer_world_size}: each "
            "process would train alone and all would write the same output_dir. Launch one process, or check "
            "train.use_cpu / train.ddp_backend / the launcher's settings so that the processes form one job")


def init_restarted_process_group(config: TrainConfig) -> bool:
    """Initialise the process group of a worker that `torchrun --max-restarts` restarted, on a store prefix of
    its own attempt. Returns whether it did (False on a first attempt, or outside torchrun).

    A restarted worker group meets in the same agent store as the attempt before, where the dead workers'
    connection addresses are still published under the same keys; a restarted rank may read a stale one and fail
    ("Gloo connectFullMesh failed ... Connection refused") or hang connecting to a dead process (pytorch#167288
    reports the same for NCCL). Measured here on gloo: 2 of 5 restarts recovered with the stock init, 5 of 5 with
    this. First attempts keep the stock init; HF and accelerate use a group that is already initialised.
    """
    import torch
    import torch.distributed as dist

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if attempt == 0 or world < 2 or dist.is_initialized():
        return False
    rank = int(os.environ["RANK"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts the store
    timeout = timedelta(seconds=float(config.train.extra_args.get("ddp_timeout", 1800)))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    backend = config.train.ddp_backend or ("nccl" if torch.cuda.is_available() and not config.train.use_cpu
                                           else "gloo")
    dist.init_process_group(backend, store=dist.PrefixStore(f"wings/restart_{attempt}/", store), rank=rank,
                            world_size=world, timeout=timeout)
    return True


def deepspeed_zero_stage(path: str | Path | None) -> int | None:
    """The ZeRO stage a DeepSpeed JSON sets (0 when it sets none); None without a DeepSpeed config."""
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"train.deepspeed: {path} is not a readable JSON file: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"train.deepspeed: {path} must hold a JSON object")
    stage = (data.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"train.deepspeed: {path} has zero_optimization.stage={stage!r}; expected 0-3")
    return int(stage)


def fsdp_requested(config: TrainConfig) -> bool:
    """FSDP asked for by the Wings config, by `train.extra_args.fsdp`, or by `accelerate launch` (its env var)."""
    return bool(config.train.fsdp or config.train.extra_args.get("fsdp")
                or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def engine_arguments(config: TrainConfig) -> dict[str, Any]:
    """`TrainingArguments` keywords for `train.fsdp` (a path to an HF `fsdp_config` JSON)."""
    if not config.train.fsdp:
        return {}
    return {"fsdp": True, "fsdp_config": str(config.train.fsdp)}


def engine_name(trainer) -> str:
    if trainer.is_deepspeed_enabled:
        return f"deepspeed-zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if trainer.is_fsdp_enabled:
        return f"fsdp{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    return "ddp" if trainer.args.world_size > 1 else "single"


def prepare_engine(config: TrainConfig, trainer, train_dataset) -> str:
    """Refuse engine setups that would not do what the config says, then complete the setup (FSDP's wrap list,
    ZeRO-3's gradient reset); returns the engine's name for the log."""
    if fsdp_requested(config) and not trainer.is_fsdp_enabled:
        # accelerate 1.15 turns FSDP on only for GPU-type devices (MULTI_GPU, MULTI_XPU, ...); on CPU it drops
        # the plugin and the run would be plain DDP, with every rank holding every weight.
        raise ValueError(
            f"FSDP was requested (train.fsdp / ACCELERATE_USE_FSDP) but accelerate did not enable it for this "
            f"{trainer.accelerator.state.distributed_type.value} run: accelerate runs FSDP on GPUs (and other "
            "accelerators) only, never on CPU processes. Launch on GPUs, or drop train.fsdp to train with DDP")
    name = engine_name(trainer)
    if name in ("deepspeed-zero3",) or name.startswith("fsdp"):
        aligned = (config.data.group_by_modality and hasattr(train_dataset, "lengths")
                   and hasattr(train_dataset, "is_multimodal"))
        if not aligned and trainer.args.world_size > 1:
            raise ValueError(
                f"{name} gathers each module's weights on every rank when it runs, so all ranks must see the same "
                "modality (image or text-only) at each step; set data.group_by_modality: true (and give a dataset "
                "with .lengths and .is_multimodal, as wings.data.build_dataset does)")
    if name == "deepspeed-zero3":
        zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
            raise ValueError("DeepSpeed ZeRO-3 with offload_optimizer is not supported: its offloaded gradients keep "
                             "a stale value for parameters a step skips (text-only steps skip the visual learner "
                             "and projector); use ZeRO-3 without optimizer offload, or ZeRO-2")
        trainer.add_callback(FreshZero3Gradients(trainer))
    configure_fsdp_wrapping(trainer)
    return name


class FreshZero3Gradients(TrainerCallback):
    """Zero ZeRO-3's flat gradient buffer at the start of every optimizer step (before its first micro-batch), so
    a parameter without a gradient in this step is stepped with zero, not with an old gradient (module docstring).
    Parameters that do get one are unaffected: ZeRO-3 copies (not adds) the first micro-batch's gradient."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        optimizer = getattr(self.trainer.deepspeed, "optimizer", None)
        buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
        if buffer is None:
            raise RuntimeError("DeepSpeed ZeRO-3 optimizer has no grad_partitions_flat_buffer: this DeepSpeed "
                               "version is not the pinned 0.19.8; check the stale-gradient reset in "
                               "wings/training/engines.py before training")
        buffer.zero_()


def configure_fsdp_wrapping(trainer) -> list[str]:
    """FSDP with the transformer wrap policy and no class list falls back on `model._no_split_modules`, which HF
    collects from the submodels' classes and which names classes this model does not contain (a SigLIP vision
    tower brings `SiglipTextEmbeddings`): accelerate then stops with "Could not find the transformer layer class".
    Keep the classes that are really there (decoder layers, vision encoder layers). Returns the list in use."""
    plugin = trainer.accelerator.state.fsdp_plugin if trainer.is_fsdp_enabled else None
    if plugin is None:
        return []
    if not plugin.transformer_cls_names_to_wrap:
        present = {type(m).__name__ for m in trainer.model.modules()}
        plugin.transformer_cls_names_to_wrap = sorted(present & set(trainer.model._no_split_modules or ()))
    return list(plugin.transformer_cls_names_to_wrap)


def prepare_final_save(trainer) -> None:
    """FSDP with sharded checkpoints (`state_dict_type: SHARDED_STATE_DICT`) writes no weights in `save_model`;
    the final HF directory needs the full state dict gathered on rank 0."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
