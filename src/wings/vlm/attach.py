"""`wings.attach` / `wings.detach`: Wings learners and router on a loaded stock transformers VLM, peft-style.

    model = AutoModelForImageTextToText.from_pretrained("llava-hf/llava-1.5-7b-hf")
    model = wings.attach(model, rank=64, stage=1)       # + visual learners; logits unchanged (B = 0)
    ...train stage 1...
    wings.vlm.add_stage2_parts(model)                    # + textual learners and the router, fresh
    model.save_pretrained(out)                           # loads with AutoModelForImageTextToText after `import wings`
    wings.save_adapter(model, adapter_dir)               # or only the Wings weights + wings_adapter.json
    wings.detach(model)                                  # the stock model again, weights untouched
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .classes import install, is_attached, stock_class, uninstall, wings_config_class, wings_model_class
from .registry import arch_for
from .settings import WingsSettings


def attach(model: nn.Module, rank: int = 64, router: str = "segment", layers: list[int] | None = None,
           stage: int = 2, **settings: Any) -> nn.Module:
    """Attach fresh Wings parts to a stock `...ForConditionalGeneration` (in place; also returned).

    Args:
        model: a loaded stock VLM of a supported type (`wings.vlm.supported_types()`).
        rank: learner rank r.  router: "segment" (layout-free, the default here) or "position" (the released
            model's).  layers: decoder layers that get learners (None: all).
        stage: 1 = visual learners only (alignment); 2 = visual and textual learners and the router.
        settings: any other `WingsSettings` field (router_mode, router_temperature, router_max_positions, ...).

    Fresh learners output exactly zero, so the model's outputs are unchanged until they are trained.
    """
    spec = WingsSettings.for_stage(stage, learner_rank=rank, router_type=router, learner_layers=layers, **settings)
    return attach_settings(model, spec)


def attach_settings(model: nn.Module, settings: WingsSettings) -> nn.Module:
    """`attach` with every setting given as one `WingsSettings` (what a saved config or adapter holds)."""
    if is_attached(model):
        raise ValueError(f"{type(model).__name__} already carries Wings learners; wings.detach(model) first, or "
                         "add the stage-2 parts with wings.add_stage2_parts(model)")
    arch = arch_for(getattr(model.config, "model_type", None))
    stock = type(model)
    expected = _stock_model_class(model.config)
    if stock is not expected:
        raise ValueError(f"wings.attach takes a {expected.__name__} (the model with its LM head, as "
                         f"AutoModelForImageTextToText loads it), got a {stock.__name__}")
    settings.check(_text_layers(model, arch))
    model.config.__class__ = wings_config_class(type(model.config))
    model.config.wings = settings.to_dict()
    model.__class__ = wings_model_class(stock)
    try:
        install(model, settings)
    except Exception:
        _restore(model)
        raise
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove every Wings part and hook: the stock model again, its own weights untouched."""
    if not is_attached(model):
        raise ValueError(f"{type(model).__name__} carries no Wings learners")
    uninstall(model)
    _restore(model)
    return model


def add_stage2_parts(model: nn.Module, **settings: Any) -> nn.Module:
    """Stage 1 -> stage 2 in place: keep the trained visual learners, add fresh textual learners and a router."""
    current = model.wings_settings
    if current.use_textual_learner and current.use_router:
        raise ValueError("the model already carries both learners and the router (stage 2)")
    visual = {name: p.detach().clone() for name, p in model.named_parameters() if ".self_attn.visual." in name}
    uninstall(model)
    updated = current.replace(use_textual_learner=True, use_router=True, **settings)
    model.config.wings = updated.to_dict()
    install(model, updated)
    missing = [name for name in visual if name not in dict(model.named_parameters())]
    if missing:
        raise ValueError(f"stage-2 settings drop trained visual learners ({len(missing)} tensors, e.g. {missing[0]})")
    params = dict(model.named_parameters())
    for name, value in visual.items():
        params[name].data.copy_(value)
    return model


def _restore(model: nn.Module) -> None:
    model.__class__ = stock_class(model)
    base_config = next(c for c in type(model.config).__mro__ if not c.model_type.startswith("wings_"))
    model.config.__class__ = base_config
    model.config.__dict__.pop("wings", None)


def _stock_model_class(config) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]


def _text_layers(model: nn.Module, arch) -> int:
    from .registry import resolve

    return resolve(model, arch.text_model).config.num_hidden_layers
