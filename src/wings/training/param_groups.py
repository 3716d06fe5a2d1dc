"""Parameter groups of a Wings model, by name: which to train, and one optimiser group per (group, decay) pair.

    vision_tower     vision_tower.*
    projector        projector.*
    visual_learner   language_model...self_attn.visual.*
    textual_learner  language_model...self_attn.textual.*
    router           language_model...self_attn.router.*
    lora             LoRA adapters on the base LLM (names hold `lora_`)
    llm              every other language_model.* parameter (the base LLM's own weights)

A stock VLM with Wings attached names its parts its own way: its registry entry (wings.vlm.registry) says which
module paths are the vision encoder and which the projector (Qwen-VL: `model.visual` and its `model.visual.merger`),
and everything else outside the learners is the `llm` group (text model, LM head).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

# Wrappers (DDP, DeepSpeed, PEFT) may prefix names; strip them so classification sees the model's own names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


def strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


@dataclass(frozen=True)
class GroupLayout:
    """Module path prefixes of the groups that are not found by their Wings names (longest prefix wins).
    `strict`: a name outside every prefix is an error (the composed model); else it belongs to `llm`."""

    vision: tuple[str, ...] = ("vision_tower",)
    projector: tuple[str, ...] = ("projector",)
    llm: tuple[str, ...] = ("language_model",)
    strict: bool = True


COMPOSED = GroupLayout()


def layout_of(model: nn.Module) -> GroupLayout:
    """The composed layout, or a stock VLM's from its registry entry (wrappers such as DDP and PEFT unwrapped)."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DDP, DeepSpeed engines
        inner = inner.module
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type in (None, "wings"):
        return COMPOSED
    from ..vlm.registry import arch_for, base_model_type

    arch = arch_for(base_model_type(model_type))
    return GroupLayout(vision=arch.vision, projector=arch.projector, llm=(), strict=False)


def classify(name: str, layout: GroupLayout = COMPOSED) -> str:
    """The group a parameter belongs to, from its name; raises for a name outside the layout (when strict)."""
    name = strip_wrappers(name)
    if "lora_" in name:
        return "lora"
    if ".self_attn.visual." in name:
        return "visual_learner"
    if ".self_attn.textual." in name:
        return "textual_learner"
    if ".self_attn.router." in name:
        return "router"
    best, group = -1, None
    for candidate, prefixes in (("vision_tower", layout.vision), ("projector", layout.projector),
                                ("llm", layout.llm)):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, group = len(prefix), candidate
    if group is not None:
        return group
    if not layout.strict:
        return "llm"
    raise ValueError(f"parameter {name!r} belongs to no known group (vision_tower, projector, language_model)")


def grouped_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    layout = layout_of(model)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = defaultdict(list)
    for name, param in model.named_parameters():
        groups[classify(name, layout)].append((name, param))
    return dict(groups)


def set_trainable(model: nn.Module, trainable: set[str]) -> dict[str, int]:
    """requires_grad = (group in `trainable`) for every parameter; returns trainable parameter counts per group.

    A group asked to train that the model does not have (e.g. textual_learner in a stage-1 model) is an error.
    """
    groups = grouped_parameters(model)
    missing = sorted(g for g in trainable if g not in groups)
    if missing:
        raise ValueError(
            f"the stage trains {missing}, but the model has no such parameters (groups present: {sorted(groups)}); "
            "check model.overrides (use_textual_learner, use_router, mode)"
        )
    counts = {}
    for group, params in groups.items():
        on = group in trainable
        for _, param in params:
            param.requires_grad_(on)
        if on:
            counts[group] = sum(p.numel() for _, p in params)
    return counts


def optimizer_param_groups(model: nn.Module, lrs: dict[str, float], weight_decays: dict[str, float],
                           decay_names: set[str]) -> list[dict]:
    """One optimiser group per (parameter group, decays?) with its own lr; biases and norms get no weight decay.

    Each dict carries a `group` key (the name) so logs and tests can find the lr of, e.g., the projector.
    """
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = defaultdict(list)
    layout = layout_of(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = classify(name, layout)
        if group not in lrs:
            raise ValueError(f"parameter {name!r} (group {group}) is trainable but its group has no learning rate")
        buckets[(group, name in decay_names)].append(param)
    out = []
    for (group, decays), params in sorted(buckets.items()):
        out.append({
            "params": params,
            "lr": lrs[group],
            "weight_decay": weight_decays.get(group, 0.0) if decays else 0.0,
            "group": group if decays else f"{group}.no_decay",
        })
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter (for before/after comparisons)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}
