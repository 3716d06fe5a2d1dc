"""Scale-out engines (DDP, DeepSpeed ZeRO, FSDP) as the HF Trainer runs them: what a config asks for, the checks
that turn a silent misconfiguration into a clear error, and the one FSDP setting the final save needs.

    ddp        torchrun / accelerate launch with neither `train.deepspeed` nor `train.fsdp`
    zero2/3    `train.deepspeed: configs/deepspeed/zero{2,3}.json`
    fsdp       `train.fsdp: configs/accelerate/fsdp.json` (an HF `fsdp_config`), or `accelerate launch
               --config_file configs/accelerate/fsdp.yaml` (which sets ACCELERATE_USE_FSDP for the workers)

ZeRO-3 and FSDP gather a module's weights collectively when the module runs. A rank whose batch has no image
skips the vision tower, so under them every rank must see the same modality at each step: the modality sampler
(`data.group_by_modality: true`) guarantees that, and `check_engine` refuses a sharded run without it (it would
hang or fail with a size mismatch rather than train).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import TrainConfig


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


def check_engine(config: TrainConfig, trainer, train_dataset) -> str:
    """Refuse engine setups that would not do what the config says, complete FSDP's wrap list; returns the
    engine's name for the log."""
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
    configure_fsdp_wrapping(trainer)
    return name


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
