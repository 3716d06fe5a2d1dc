"""Which stock transformers VLMs Wings attaches to, and where each keeps the parts Wings needs.

One `VLMArch` per `model_type`. Every supported family keeps its image tokens inside the text model's
self-attention sequence (spliced in with `masked_scatter` before the decoder runs), and its text model's attention
modules take `position_embeddings` and a `config._attn_implementation` dispatch, which is all the Wings hooks need
(modeling/attention.py). Adding a LLaVA-like architecture is one entry here and its row in the tests.

Parameter groups (what a training stage freezes or trains) are named by module path prefixes; the longest prefix
that matches a parameter's name wins, so `model.visual.merger` (Qwen-VL's projector) is carved out of
`model.visual` (its vision encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VLMArch:
    """Where a stock `...ForConditionalGeneration` keeps what Wings needs.

    Args:
        model_type: the stock config's `model_type`.
        text_model: attribute path from the top-level model to the headless decoder (`.layers`, `.rotary_emb`).
        visual_ids: config attributes holding the ids of visual placeholder tokens (their layer-0 embeddings are
            the visual learner's features; every other real token feeds the textual learner).
        mrope: position ids arrive as `[3|4, B, T]` (M-RoPE); learner keys then rotate with their own 3D ids.
        vision: module paths of the vision encoder (the `vision_tower` group).
        projector: module paths of the vision-to-text connector (the `projector` group).
        pixels_per_sample: pixel tensors are batched per sample (`[B, images, ...]`, zero images as padding)
            rather than per image (`[images, ...]`).
        projector_note: what "the projector" is in this family, for docs and the start-of-run summary.
    """

    model_type: str
    text_model: str = "model.language_model"
    visual_ids: tuple[str, ...] = ("image_token_id",)
    mrope: bool = False
    vision: tuple[str, ...] = ("model.vision_tower",)
    projector: tuple[str, ...] = ("model.multi_modal_projector",)
    pixels_per_sample: bool = False
    projector_note: str = "the multi-modal projector (`multi_modal_projector`)"


_QWEN_VL = dict(visual_ids=("image_token_id", "video_token_id"), mrope=True, vision=("model.visual",),
                projector=("model.visual.merger",),
                projector_note="the vision merger (`visual.merger`: 2x2 patch merge + MLP into the LLM's width)")
_IDEFICS = dict(text_model="model.text_model", vision=("model.vision_model",), projector=("model.connector",),
                pixels_per_sample=True,
                projector_note="the connector (`connector`: pixel shuffle + linear into the LLM's width)")

ARCHS: dict[str, VLMArch] = {arch.model_type: arch for arch in (
    VLMArch("llava"),
    VLMArch("llava_next", projector=("model.multi_modal_projector", "model.image_newline"),
            projector_note="the multi-modal projector and the learned `image_newline` row separator"),
    VLMArch("llava_onevision", visual_ids=("image_token_id", "video_token_id"),
            projector=("model.multi_modal_projector", "model.image_newline"),
            projector_note="the multi-modal projector and the learned `image_newline` row separator"),
    VLMArch("qwen2_vl", **_QWEN_VL),
    VLMArch("qwen2_5_vl", **_QWEN_VL),
    VLMArch("qwen3_vl", **{**_QWEN_VL, "projector": ("model.visual.merger", "model.visual.deepstack_merger_list"),
                           "projector_note": "the vision mergers (`visual.merger` and the DeepStack "
                                             "`visual.deepstack_merger_list`)"}),
    VLMArch("idefics3", **_IDEFICS),
    VLMArch("smolvlm", **_IDEFICS),
    VLMArch("internvl", projector_note="the multi-modal projector (`multi_modal_projector`: pixel shuffle + MLP)"),
)}

# Known and refused, with the reason (the message names the supported types too).
REFUSED = {
    "mllama": "Llama-3.2-Vision puts images into gated cross-attention layers only, never into the self-attention "
              "sequence: Wings' premise (text tokens attend to image tokens, the router reads that attention mass) "
              "does not apply, and its zero-init gated cross-attention already is a visual side branch",
    "gemma3": "Gemma 3 normalises the attention output before the residual add (the Wings delta would be "
              "normalised too), keeps one RoPE table per layer type, and its sliding-window layers keep fewer keys "
              "than the router has values; not supported yet",
    "paligemma": "PaliGemma attends bidirectionally over image and prompt (prefix-LM), and PaliGemma 2's Gemma 2 "
                 "normalises the attention output before the residual add and soft-caps logits; not supported yet",
}


class UnsupportedVLM(ValueError):
    """A model type Wings cannot attach to (the message says why and names the supported ones)."""


def supported_types() -> list[str]:
    return sorted(ARCHS)


def arch_for(model_type: str | None) -> VLMArch:
    """The registry entry of a stock `model_type` (an attached model's `wings_<type>` works too)."""
    base = base_model_type(model_type)
    if base in ARCHS:
        return ARCHS[base]
    supported = ", ".join(supported_types())
    if base in REFUSED:
        raise UnsupportedVLM(f"Wings cannot attach to model_type {base!r}: {REFUSED[base]}. Supported: {supported}")
    raise UnsupportedVLM(f"Wings has no attach entry for model_type {base!r}; supported: {supported} "
                         "(a LLaVA-like model is one entry in wings/vlm/registry.py)")


WINGS_PREFIX = "wings_"


def base_model_type(model_type: str | None) -> str | None:
    """`wings_llava` -> `llava` (the config type of an attached model, see classes.py); others unchanged."""
    if model_type and model_type.startswith(WINGS_PREFIX) and model_type[len(WINGS_PREFIX):] in ARCHS:
        return model_type[len(WINGS_PREFIX):]
    return model_type


def resolve(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted attribute path, or a ValueError naming the path and the model class."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no submodule {path!r}; the Wings registry entry for "
                         f"{getattr(model.config, 'model_type', '?')!r} does not match this model") from None


def visual_token_ids(config, arch: VLMArch) -> list[int]:
    """The placeholder ids whose positions hold vision features (image, and video where the family has one)."""
    ids = []
    for name in arch.visual_ids:
        value = getattr(config, name, None)
        if value is not None and value >= 0:
            ids.append(int(value))
    if not ids:
        raise ValueError(f"{config.model_type}: the config names no image token id ({', '.join(arch.visual_ids)})")
    return ids


def visual_mask(input_ids: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """[B, T] bool: the positions that hold vision features."""
    mask = input_ids == ids[0]
    for token in ids[1:]:
        mask = mask | (input_ids == token)
    return mask
