"""Config and model classes of stock VLMs with Wings attached, made per stock class and registered with the Auto
classes, so a saved directory loads with `AutoModelForImageTextToText.from_pretrained` after `import wings`.

`WingsLlavaForConditionalGeneration` is `LlavaForConditionalGeneration` plus `WingsVLMMixin`; its config class
`WingsLlavaConfig` is `LlavaConfig` with `model_type = "wings_llava"` and a `wings` field (the attach settings).
Nothing of the stock model changes: the same modules, the same forward, the same weight names (on disk too: the
stock checkpoint-key conversions are registered for the new type), plus learners and a router under each chosen
layer's `self_attn` and two forward pre-hooks (hooks.py). `wings.attach` turns a loaded stock model into its
Wings class in place (a class swap, no copy); `wings.detach` turns it back.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from ..modeling.cache import keep_placeholders_out, learner_aware_cache
from ..modeling.inject import detach_learners, inject_learners
from ..modeling.kernels import WingsKernels
from ..modeling.modeling_wings import LearnerInitMixin
from .hooks import OWNER, clear_context, wings_text_hook, wings_top_hook
from .registry import ARCHS, WINGS_PREFIX, arch_for, resolve, visual_token_ids
from .settings import WingsSettings

_CONFIG_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


class WingsVLMMixin(LearnerInitMixin):
    """What a stock VLM class gains with Wings attached (see the module docstring)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        install(self, WingsSettings.from_dict(getattr(config, "wings", None), f"{config.model_type} config.wings"))

    @property
    def wings_settings(self) -> WingsSettings:
        return WingsSettings.from_dict(self.config.wings)

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        # `wings_record` (router weights, for analysis and the server's router strip) is taken off the call by the
        # top-level pre-hook, so the stock forward never sees it; generate must let it through to there.
        super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k != "wings_record"})

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # Never generate a placeholder (no image would fill it); keep the learner cache in step with beams & co.
        has_images = any(model_kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
        keep_placeholders_out(generation_config, self._wings_visual_ids, has_images)
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        learner_aware_cache(generation_config, model_kwargs)


def wings_config_class(stock: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    """`Wings<Stock>Config`: the stock config class with `model_type = "wings_<type>"` and a `wings` field."""
    if stock not in _CONFIG_CLASSES:
        namespace = {"model_type": WINGS_PREFIX + stock.model_type, "__module__": __name__,
                     "__annotations__": {"wings": "dict | None"}, "wings": None,
                     "__doc__": f"`{stock.__name__}` with Wings attached; `wings` holds the attach settings."}
        _CONFIG_CLASSES[stock] = type(f"Wings{stock.__name__}", (stock,), namespace)
    return _CONFIG_CLASSES[stock]


def wings_model_class(stock: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """`Wings<Stock>`: the stock model class with `WingsVLMMixin` (and the Wings config class)."""
    if stock not in _MODEL_CLASSES:
        namespace = {"config_class": wings_config_class(stock.config_class), "__module__": __name__,
                     "__doc__": f"`{stock.__name__}` with Wings learners and router (wings.vlm)."}
        _MODEL_CLASSES[stock] = type(f"Wings{stock.__name__}", (WingsVLMMixin, stock), namespace)
    return _MODEL_CLASSES[stock]


def stock_class(model: nn.Module) -> type:
    """The stock class under a Wings class (the class itself for a stock model)."""
    cls = type(model)
    return next(base for base in cls.__mro__ if base not in _MODEL_CLASSES.values() and base is not WingsVLMMixin
                and base is not LearnerInitMixin)


def is_attached(model: nn.Module) -> bool:
    return isinstance(model, WingsVLMMixin)


def install(model: nn.Module, settings: WingsSettings) -> None:
    """Learners (and router) on the text model, the two pre-hooks, and what the hooks read off the model."""
    arch = arch_for(model.config.model_type)
    text_model = resolve(model, arch.text_model)
    spec = settings.bind(text_model.config)
    model._wings_visual_ids = visual_token_ids(model.config, arch)
    model._wings_mrope = arch.mrope
    model._wings_spec = spec
    model.wings_kernels = WingsKernels()
    inject_learners(text_model, spec)
    text_model.__dict__[OWNER] = model  # (not a submodule: the text model is already one of the model's)
    model.register_forward_pre_hook(wings_top_hook, with_kwargs=True)
    model.register_forward_hook(clear_context, always_call=True)
    text_model.register_forward_pre_hook(wings_text_hook, with_kwargs=True)


def uninstall(model: nn.Module) -> None:
    arch = arch_for(model.config.model_type)
    text_model = resolve(model, arch.text_model)
    # Found by function rather than by handle: a deep copy of the model has its own hook dicts, and handles copied
    # with it would point at the original's.
    _remove_hooks(model, (wings_top_hook, clear_context))
    _remove_hooks(text_model, (wings_text_hook,))
    detach_learners(text_model)
    text_model.__dict__.pop(OWNER, None)
    for name in ("_wings_visual_ids", "_wings_mrope", "_wings_spec", "wings_kernels"):
        model.__dict__.pop(name, None)


def _remove_hooks(module: nn.Module, functions: tuple) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in functions]:
            del hooks[key]
            for extra in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                          module._forward_hooks_always_called):
                extra.pop(key, None)


def register_classes() -> None:
    """Register every supported family's Wings config and model classes with the Auto classes, and give the Wings
    types the stock checkpoint-key conversions (saved weights keep the stock on-disk names)."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for model_type in ARCHS:
        stock_config = CONFIG_MAPPING[model_type]
        stock_model = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[stock_config]
        config_cls, model_cls = wings_config_class(stock_config), wings_model_class(stock_model)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForImageTextToText.register(config_cls, model_cls, exist_ok=True)
        # The stock conversions are found by class name first, then by model type (conversion_mapping.py).
        for stock_name, wings_name in ((stock_model.__name__, model_cls.__name__),
                                       (model_type, config_cls.model_type)):
            conversions = get_checkpoint_conversion_mapping(stock_name)
            if conversions is not None:
                register_checkpoint_conversion_mapping(wings_name, conversions, overwrite=True)
