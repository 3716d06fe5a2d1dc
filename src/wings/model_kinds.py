"""The two kinds of model every `wings` command accepts, behind one set of facts and one loader.

- a composed Wings (or LLaVA-mode) model: `WingsForConditionalGeneration` (`config.json` model_type "wings"),
  with a `WingsProcessor`;
- a stock transformers VLM with Wings attached (`wings.vlm`, model_type "wings_<stock type>"), with the stock
  processor; a plain stock VLM directory (no Wings parts) loads too, as the baseline it is (mode "llava").

Commands read what they need from `model_facts(model)` (placeholder ids, mode, the hard context limit) instead of
from one config class, and load with `load_model` / `load_processor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelFacts:
    """What the commands need to know about a loaded model, whatever its kind.

    Attributes:
        attached: a stock VLM (with or without Wings parts) rather than a composed `WingsForConditionalGeneration`.
        mode: "wings" (learners present) or "llava" (none: the baseline).
        visual_ids: token ids whose positions hold vision features.
        use_router / router_type: the router's presence and type ("position" | "segment").
        context_length: tokens a sequence may hold: the text model's, or the position router's width if smaller.
        text_config: the decoder's config.
    """

    attached: bool
    mode: str
    visual_ids: tuple[int, ...]
    use_router: bool
    router_type: str | None
    context_length: int
    text_config: Any

    @property
    def image_token_id(self) -> int:
        return self.visual_ids[0]


def model_facts(model: nn.Module) -> ModelFacts:
    from .vlm.classes import is_attached
    from .vlm.registry import arch_for, base_model_type, visual_token_ids

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "wings":
        limit = int(config.text_config.max_position_embeddings)
        position = config.mode == "wings" and config.use_router and config.router_type == "position"
        if position:
            limit = min(limit, int(config.router_width))
        return ModelFacts(False, config.mode, (int(config.image_token_id),), bool(config.use_router and
                          config.mode == "wings"), config.router_type if config.mode == "wings" else None, limit,
                          config.text_config)
    arch = arch_for(base_model_type(model_type))
    text_config = config.get_text_config()
    limit = int(getattr(text_config, "max_position_embeddings", 1 << 30))
    if not is_attached(model):
        return ModelFacts(True, "llava", tuple(visual_token_ids(config, arch)), False, None, limit, text_config)
    settings = model.wings_settings
    if settings.use_router and settings.router_type == "position":
        limit = min(limit, int(model._wings_spec.router_width))
    return ModelFacts(True, "wings", tuple(visual_token_ids(config, arch)), settings.use_router,
                      settings.router_type if settings.use_router else None, limit, text_config)


def read_model_type(path: str | Path) -> str | None:
    from .model_dir import read_config
    from .paths import require_dir

    return read_config(require_dir(path, "model directory"), "model directory").get("model_type")


def is_vlm_type(model_type: str | None) -> bool:
    """A stock VLM type Wings attaches to, or such a type with Wings attached (`wings_<type>`)."""
    from .vlm.registry import ARCHS, base_model_type

    return base_model_type(model_type) in ARCHS


def is_multimodal_type(model_type: str | None) -> bool:
    """A model type that takes images: a composed Wings model or a stock VLM (Wings attached or not)."""
    return model_type == "wings" or is_vlm_type(model_type)


def load_model(path: str | Path, dtype: torch.dtype | None = None, overrides: dict[str, Any] | None = None,
               quantize: str | None = None, quantization_config: Any = None, **kwargs: Any) -> nn.Module:
    """A composed Wings/LLaVA model or a stock VLM (Wings attached or not) from its directory.

    `overrides`: Wings fields applied on load (`use_textual_learner`, `use_router`, `mode`, ...): for a composed
    model `WingsConfig` fields; for a stock VLM the attached settings (`wings.vlm.WingsSettings`), where
    `mode: llava` loads the stock model without its Wings parts and `mode: wings` on a plain stock directory
    attaches fresh ones.

    `quantize` ("int8" | "nf4") or `quantization_config` (a transformers quantization config, e.g.
    `BitsAndBytesConfig`) loads the LLM's linear layers quantized, on `device_map`'s one device (default: CUDA
    when present, else CPU); the learners, router, projector, vision tower and LM head stay in `dtype`
    (wings.quantization)."""
    import wings  # noqa: F401  (registers the Auto classes)

    overrides = dict(overrides or {})
    if dtype is not None:
        kwargs["dtype"] = dtype
    model_type = read_model_type(path)
    if quantize is None and quantization_config is None:
        return _load(path, model_type, overrides, kwargs)
    from .quantization import after_load

    kwargs.update(_quantized_kwargs(path, model_type, overrides, quantize, quantization_config, dtype,
                                    kwargs.pop("device_map", None)))
    return after_load(_load(path, model_type, overrides, kwargs))


def _load(path: str | Path, model_type: str | None, overrides: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    if not is_vlm_type(model_type):
        return AutoModelForImageTextToText.from_pretrained(path, **overrides, **kwargs)
    from .vlm import WingsSettings
    from .vlm.attach import attach_settings
    from .vlm.registry import WINGS_PREFIX

    config = AutoConfig.from_pretrained(path)
    mode = overrides.pop("mode", "wings" if model_type.startswith(WINGS_PREFIX) else "llava")
    if mode not in ("wings", "llava"):
        raise ValueError(f"mode must be 'wings' or 'llava', got {mode!r}")
    stored = getattr(config, "wings", None)
    if mode == "llava" or stored is None:  # the stock model (its Wings tensors, if any, are not loaded)
        if stored is not None:
            config = _stock_config(config)
        model = AutoModelForImageTextToText.from_pretrained(path, config=config, **kwargs)
        if mode == "wings":  # a plain stock directory asked for Wings: fresh parts (the stage-1 set by default)
            attach_settings(model, WingsSettings.for_stage(1).replace(**overrides))
        return model
    config.wings = WingsSettings.from_dict(stored).replace(**overrides).to_dict()
    return AutoModelForImageTextToText.from_pretrained(path, config=config, **kwargs)


def _quantized_kwargs(path, model_type, overrides, quantize, quantization_config, dtype, device_map) -> dict:
    from .quantization import QuantizationError, loading_kwargs

    device = None
    if device_map is not None:
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if len(devices) != 1:
            raise QuantizationError(f"a quantized load takes one device, got device_map {device_map!r}")
        device = next(iter(devices))
    if is_vlm_type(model_type) and overrides.get("mode") == "wings" and not model_type.startswith("wings_"):
        # Fresh learners follow the attention's dtype (wings.vlm.attach), which is an integer one once quantized.
        raise QuantizationError(f"{path} is a stock VLM without Wings parts: a quantized load attaches none; "
                                "write a Wings directory first (`wings init-model --vlm`), then load that")
    return loading_kwargs(model_type, quantize, quantization_config, dtype, device)


def _stock_config(config):
    base = next(c for c in type(config).__mro__ if not c.model_type.startswith("wings_"))
    data = config.to_dict()
    data.pop("wings", None)
    data["model_type"] = base.model_type
    return base.from_dict(data)


def load_processor(path: str | Path):
    """The processor saved beside a model: a `WingsProcessor`, or the stock one (video half left out where it
    cannot be built here: wings.vlm.processor)."""
    import wings  # noqa: F401  (registers WingsProcessor)

    from .vlm.processor import load_processor as load

    return load(path)


def save_processor(processor, out_dir: str | Path) -> None:
    from .vlm.processor import save_processor as save

    save(processor, out_dir)


def data_pipeline(model: nn.Module, processor, max_length: int, padding_side: str = "right"):
    """(formatter, collator) for training data of this model: None (the Wings pipeline's own `WingsFormatter`)
    and `WingsDataCollator` for a composed model; the stock-processor pipeline (wings.vlm.data) for a stock VLM."""
    if getattr(model.config, "model_type", None) == "wings":
        from .data import WingsDataCollator

        return None, WingsDataCollator.from_processor(processor, padding_side=padding_side)
    from .vlm.data import VLMDataCollator, VLMFormatter
    from .vlm.registry import arch_for, base_model_type

    arch = arch_for(base_model_type(model.config.model_type))
    facts = model_facts(model)
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        pad = processor.tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token to pad batches with")
    formatter = VLMFormatter(processor, arch, list(facts.visual_ids), max_length)
    return formatter, VLMDataCollator(int(pad), arch, padding_side)


def describe_groups(model: nn.Module) -> str | None:
    """For the start-of-run summary: what the `projector` and `vision_tower` groups are in a stock VLM."""
    if getattr(model.config, "model_type", None) == "wings":
        return None
    from .vlm.registry import arch_for, base_model_type

    arch = arch_for(base_model_type(model.config.model_type))
    return (f"{arch.model_type}: projector = {arch.projector_note}; vision_tower = {', '.join(arch.vision)} "
            f"(without the projector); llm = the rest outside the learners (text model, LM head)")


def language_model(model: nn.Module) -> nn.Module:
    """The model's LLM (a module whose `layers`, or `model.layers`, are the decoder layers)."""
    if getattr(model.config, "model_type", None) == "wings":
        return model.language_model
    from .vlm.registry import arch_for, base_model_type, resolve

    return resolve(model, arch_for(base_model_type(model.config.model_type)).text_model)
