"""`WingsTrainer`: HF `Trainer` with per-group learning rates and the modality-grouped sampler.

Everything else (gradient accumulation, schedules, clipping, mixed precision, gradient checkpointing,
checkpoints and resume, DDP / DeepSpeed / FSDP, logging) is the stock Trainer's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .engines import prepare_final_save
from .param_groups import optimizer_param_groups

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class WingsTrainer(Trainer):
    """Trainer for Wings stages.

    Args (beyond `Trainer`'s):
        group_lrs / group_weight_decays: per parameter group (see `param_groups.classify`); every trainable
            parameter's group must be present.
        group_by_modality: sample with `wings.data.ModalityLengthGroupedSampler` (each step all-image or
            all-text, similar lengths) when the dataset exposes `.lengths` and `.is_multimodal`.
    """

    def __init__(self, *args, group_lrs: dict[str, float], group_weight_decays: dict[str, float] | None = None,
                 group_by_modality: bool = True, **kwargs):
        self.group_lrs = dict(group_lrs)
        self.group_weight_decays = dict(group_weight_decays or {})
        self.group_by_modality = group_by_modality
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))  # no decay on biases and norms
            groups = optimizer_param_groups(opt_model, self.group_lrs, self.group_weight_decays, decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)  # every group carries its own
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # HF logs only the first optimizer group's lr; add every parameter group's (console, TensorBoard, wandb).
        # All HF schedules scale each group's base lr by one factor, read off the logged `learning_rate`.
        scheduler = self.lr_scheduler
        if "loss" in logs and "learning_rate" in logs and self.optimizer is not None and scheduler is not None:
            base = getattr(scheduler, "base_lrs", None)
            if base and base[0] > 0:
                factor = float(logs["learning_rate"]) / base[0]
                for group, lr0 in zip(self.optimizer.param_groups, base, strict=False):
                    name = str(group.get("group", ""))
                    if name and not name.endswith(".no_decay"):
                        logs[f"lr/{name}"] = lr0 * factor
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_modality and hasattr(dataset, "lengths") and hasattr(dataset, "is_multimodal"):
            from ..data import ModalityLengthGroupedSampler

            return ModalityLengthGroupedSampler(
                dataset.lengths, dataset.is_multimodal, self.args.per_device_train_batch_size,
                world_size=self.args.world_size, seed=self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if inputs.get("pixel_values") is None:
            # A text-only batch never reaches the projector (or vision tower). Under DDP with
            # find_unused_parameters=False every trainable parameter must get a gradient each step, so give
            # those a zero-valued one (the learners do the same through `anchor()`).
            anchor = self._image_path_anchor(model)
            if anchor is not None:
                if return_outputs:
                    result = (result[0] + anchor, result[1])
                else:
                    result = result + anchor
        return result

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # transformers 5.24 saves a checkpoint under the model's on-disk names (the stock VLM classes revert their
        # key renamings: `model.language_model.*` -> `language_model.model.*`), but the Trainer's resume loads it
        # with `load_state_dict(..., strict=False)` under the in-memory names: nothing matches, a warning is logged
        # and training silently continues from the start weights. Load such checkpoints under the right names and
        # refuse any mismatch.
        model = self.model if model is None else model
        names = checkpoint_names(model) if not (self.is_fsdp_enabled or self.is_deepspeed_enabled) else None
        files = sorted(Path(resume_from_checkpoint).glob("model*.safetensors"))
        if names is None or not files:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        state = {names.get(key, key): tensor for file in files for key, tensor in load_file(str(file)).items()}
        result = model.load_state_dict(state, strict=False)
        tied = set(tied_parameter_names(model))
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint {resume_from_checkpoint} does not fit the model: missing {missing[:3]} "
                             f"({len(missing)}), unexpected {result.unexpected_keys[:3]} "
                             f"({len(result.unexpected_keys)})")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        # Each rank writes its own part of a checkpoint (its RNG state; ZeRO / FSDP shards) and rank 0 then writes
        # trainer_state.json, the file that marks the checkpoint complete. Wait for every rank first: a rank that
        # dies mid-save then leaves a checkpoint without trainer_state.json, which resume skips.
        self.accelerator.wait_for_everyone()

    def _image_path_anchor(self, model) -> torch.Tensor | None:
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return None  # ZeRO-3 partitions parameters outside forward; its own reducer tolerates missing grads
        from .param_groups import grouped_parameters

        groups = grouped_parameters(self.accelerator.unwrap_model(model))
        params = [p for group in ("vision_tower", "projector") for _, p in groups.get(group, ()) if p.requires_grad]
        if not params:
            return None
        return sum(p.sum() for p in params) * 0.0


def checkpoint_names(model) -> dict[str, str] | None:
    """{on-disk name: in-memory name} for a model whose `save_pretrained` renames its weights (stock VLMs), None
    when it saves them under their own names or converts them beyond renaming."""
    from transformers.core_model_loading import revert_weight_conversion

    markers = {name: torch.empty(0) for name in model.state_dict()}  # distinct objects: renaming keeps identity
    reverted = revert_weight_conversion(model, dict(markers))
    memory_name = {id(t): name for name, t in markers.items()}
    names = {disk: memory_name.get(id(t)) for disk, t in reverted.items()}
    if any(v is None for v in names.values()) or all(disk == name for disk, name in names.items()):
        return None
    return names


def tied_parameter_names(model) -> list[str]:
    """Parameters a checkpoint leaves out because they are tied to another (e.g. the LM head to the embeddings)."""
    return list(getattr(model, "all_tied_weights_keys", None) or {})  # (what transformers ties for this config)


class LossRecorder(TrainerCallback):
    """Keeps every logged training loss with its step (the per-step curve when logging_steps=1)."""

    def __init__(self):
        self.steps: list[int] = []
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append(state.global_step)
            self.losses.append(float(logs["loss"]))


def is_complete_checkpoint(path: Path) -> bool:
    """HF writes a checkpoint in place, trainer_state.json last: a checkpoint counts once that file parses and the
    model weights are there (a run killed mid-save leaves a dir without them, which resume must skip)."""
    state = path / "trainer_state.json"
    if not state.is_file():
        return False
    try:
        json.loads(state.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("global_step*"))
            or fsdp_shards_complete(path))


def fsdp_shards_complete(path: Path) -> bool:
    """An FSDP SHARDED_STATE_DICT checkpoint keeps its weights in `pytorch_model_fsdp_N/` (torch.distributed
    .checkpoint); its `.metadata` is written once every rank has written its shard."""
    shards = list(path.glob("pytorch_model_fsdp_*"))
    return bool(shards) and all((d / ".metadata").is_file() for d in shards)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N dirs in step order (complete or not)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = [p for p in checkpoints(output_dir) if is_complete_checkpoint(p)]
    return complete[-1] if complete else None


def save_final_atomic(trainer: Trainer, processor, final_dir: str | Path) -> Path:
    """Write model (+ processor) to a temp dir next to `final_dir`, then rename it into place.

    Every rank calls this (DeepSpeed ZeRO-3 and FSDP gather weights collectively in `save_model`); only the
    main process writes and renames. A failure (a full disk, Ctrl-C) removes the temp dir and leaves the previous
    `final_dir`, if any, untouched.
    """
    from ..atomic import replace_dir

    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp")
    if trainer.args.should_save and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    prepare_final_save(trainer)  # gather a full state dict under sharded FSDP (engines.py)
    try:
        trainer.save_model(str(tmp))
        if trainer.args.should_save:
            if processor is not None:
                from ..model_kinds import save_processor

                save_processor(processor, tmp)
            # The training arguments HF drops into the folder are for resuming, not for loading the model.
            (tmp / "training_args.bin").unlink(missing_ok=True)
            replace_dir(tmp, final_dir)
    finally:
        if trainer.args.should_save and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return final_dir
