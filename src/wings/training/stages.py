"""Prepare a model for a stage: load it with the stage's config overrides, add LoRA if asked, freeze the rest.

Stage 1 loads a model built with `use_textual_learner=False, use_router=False` (or overrides an init-model dir
to that); stage 2 loads the stage-1 result with both set to True, which gives fresh textual learners (B = 0,
so the output is unchanged at the start) and a fresh router. `mode: llava` drops all learners.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .config import GROUPS, TrainConfig
from .param_groups import set_trainable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_stage_model(config: TrainConfig):
    """Load `config.model.path` with `config.model.overrides` applied; check the mode the stage expects.

    The directory holds a composed Wings/LLaVA model or a stock VLM (with Wings attached, or plain: the baseline);
    `model.overrides` are Wings fields either way (wings.model_kinds.load_model)."""
    from ..model_kinds import load_model, model_facts

    path = Path(config.model.path) if config.model.path else None
    if path is None:
        raise ValueError("model.path is empty: give the model directory to start from (--set model.path=DIR)")
    if not path.is_dir():
        raise FileNotFoundError(f"model.path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path {path} has no config.json; expected a directory written by `wings init-model` "
                         "or an earlier stage's final/")
    overrides = dict(config.model.overrides)
    if overrides.get("mode", "wings") not in ("wings", "llava"):
        raise ValueError(f"model.overrides.mode must be 'wings' or 'llava', got {overrides['mode']!r}")
    # Base weights keep their stock names in both modes, so a mode override just drops the learners
    # (wings -> llava) or adds fresh zero-output ones (llava -> wings) while loading.
    model = load_model(path, dtype=DTYPES[config.model.dtype], overrides=overrides)
    mode = model_facts(model).mode
    if mode != config.mode:
        raise ValueError(
            f"stage {config.stage!r} expects a {config.mode}-mode model but {path} loads as {mode!r}; "
            f"set model.overrides.mode={config.mode}"
        )
    return model


def lora_target_regex(targets: list[str], layers_path: str = "language_model.model.layers") -> str:
    """Base-LLM linear layers only: the attention's own projections (`self_attn.q_proj`, ...) and the MLP of the
    decoder layers under `layers_path` (a stock VLM's: its text model's, e.g. `model.language_model.layers`).

    The learners' own projections (`self_attn.visual.q_proj.*`) share names with the attention's, so the regex
    anchors on the module path, never on a bare name.
    """
    names = "|".join(sorted(set(targets)))
    return rf".*{re.escape(layers_path)}\.\d+\.(?:self_attn|mlp)\.(?:{names})"


def decoder_layers_path(model: nn.Module) -> str:
    """Where the decoder layers of the model's LLM sit (composed model or stock VLM)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type == "wings":
        return "language_model.model.layers"
    from ..vlm.registry import arch_for, base_model_type

    return f"{arch_for(base_model_type(model_type)).text_model}.layers"


def add_lora(model: nn.Module, config: TrainConfig) -> int:
    """Inject LoRA adapters in place (the model stays a WingsForConditionalGeneration, so checkpoints hold every
    trained tensor, learners included); returns how many layers got adapters."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    lora = config.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora_target_regex(lora.targets, decoder_layers_path(model)),
                             bias="none")
    inject_adapter_in_model(peft_config, model)
    wrapped = sum(isinstance(m, LoraLayer) for m in model.modules())
    if wrapped == 0:
        raise ValueError(f"lora.targets {lora.targets} matched no linear layer of the LLM")
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the plain layer back (saved dirs stay HF-loadable)."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
        merged += 1
    return merged


def prepare_model(config: TrainConfig) -> tuple[nn.Module, dict[str, int]]:
    """Load, add LoRA if enabled, and set requires_grad by group; returns (model, trainable counts per group)."""
    model = load_stage_model(config)
    if config.train.learner_recompute and hasattr(model, "wings_kernels"):
        model.wings_kernels.learner_recompute = config.train.learner_recompute
    trainable = {g for g in GROUPS if config.trains(g)}
    if config.lora.enabled:
        add_lora(model, config)
        trainable.add("lora")
    counts = set_trainable(model, trainable)
    return model, counts


def stage_learning_rates(config: TrainConfig) -> tuple[dict[str, float], dict[str, float]]:
    """(lr, weight decay) per trainable group, with the LoRA adapters following `lora.lr`."""
    lrs = {g: config.group_lr(g) for g in GROUPS if config.trains(g)}
    wds = {g: config.group_weight_decay(g) for g in GROUPS if config.trains(g)}
    if config.lora.enabled:
        lrs["lora"] = config.lora_lr()
        wds["lora"] = config.group_weight_decay("llm")
    return lrs, wds
