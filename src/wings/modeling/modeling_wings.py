"""`WingsForConditionalGeneration`: vision encoder -> projector -> decoder LLM (+ Wings learners), HF-native."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from ..configuration import WingsConfig, has_cls_token
from .compat import apply_official, use_cache_official
from .inject import decoder_layers, inject_learners
from .kernels import WingsKernels
from .learner import LowRankLinear
from .projector import build_projector
from .state import build_state

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    # What transformers' `create_masks_for_generate` returns: one mask, or one per attention type (full,
    # sliding); a mask is a tensor, a flex `BlockMask`, or None (the kernel's own causal mask).
    MaskForGenerate = torch.Tensor | BlockMask | dict[str, torch.Tensor | BlockMask | None] | None

SUPPORTED_VISION = ("siglip_vision_model", "clip_vision_model")


class LearnerInitMixin:
    """Weight initialisation for a `PreTrainedModel` that carries Wings learners: zero-init learners (B = 0) whether
    the model is built from a config or loaded (learners missing from the checkpoint start fresh)."""

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LowRankLinear):
            module.reset_parameters()
        else:
            super()._init_weights(module)

    def initialize_weights(self) -> None:
        # HF dispatches the LLM's `_init_weights` to everything under the language model, learners included;
        # give the learners their zero-init first (skipping weights a checkpoint just loaded), then flag them.
        for module in self.modules():
            if isinstance(module, LowRankLinear):
                module.reset_parameters()
        super().initialize_weights()


class WingsPreTrainedModel(LearnerInitMixin, PreTrainedModel):
    config_class = WingsConfig
    config: WingsConfig
    base_model_prefix = "wings"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Sub-models initialise themselves in from_config; only our own parts need it here.
        if isinstance(module, LowRankLinear):
            module.reset_parameters()


class WingsForConditionalGeneration(WingsPreTrainedModel, GenerationMixin):
    """A LLaVA-style MLLM whose decoder layers may carry Wings visual/textual learners and a router.

    Composition, never copied modeling code: `vision_tower = AutoModel.from_config(vision_config)`,
    `projector` (LLaVA naming), `language_model = AutoModelForCausalLM.from_config(text_config)` with
    learners and a router attached to each chosen layer's `self_attn` (mode="wings"; see attention.py).
    """

    def __init__(self, config: WingsConfig):
        super().__init__(config)
        check_supported(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.projector = build_projector(
            config.projector_type, config.vision_config.hidden_size, config.text_config.hidden_size
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        if config.mode == "wings":
            inject_learners(self.language_model, config)
        self.wings_kernels = WingsKernels()  # how the Wings parts run (kernels.py); never changes the result
        self.post_init()

    @property
    def _tied_weights_keys(self):  # the LLM's own tying, seen from this model's key names
        inner = getattr(self.language_model, "_tied_weights_keys", None) or {}
        if isinstance(inner, dict):
            return {f"language_model.{k}": f"language_model.{v}" for k, v in inner.items()}
        return [f"language_model.{k}" for k in inner]

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> projected image tokens [N, image_seq_length, d_text]."""
        self.check_pixel_values(pixel_values)
        param = next(self.vision_tower.parameters())
        out = self.vision_tower(pixel_values.to(param.device, param.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.vision_feature_layer]  # [N, P(+1), d_vision]
        if has_cls_token(self.config.vision_config) and self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        return self.projector(feats)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [num_images, 3, H, W], got shape {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a float tensor, got dtype {pixel_values.dtype}")
        size = self.config.vision_config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} but the vision encoder expects ({size}, {size}); "
                "preprocess images with the model's WingsProcessor"
            )

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             pixel_values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Splice projected image tokens into the `<image>` positions; raise on any count mismatch."""
        if pixel_values is not None:
            self.check_pixel_values(pixel_values)
        is_image = input_ids == self.config.image_token_id
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        per_image = self.config.image_seq_length
        # A host-side count: checked in eager mode; a compiled step (decoding, where no image arrives) skips it.
        n_tokens = None if torch.compiler.is_compiling() else int(is_image.sum())
        if n_tokens is not None and n_tokens != n_images * per_image:
            raise ValueError(
                f"Image features and image tokens do not match: the text holds {n_tokens} image tokens "
                f"({n_tokens / per_image:g} `<image>` placeholders of {per_image} tokens) but {n_images} images "
                "were given"
            )
        if n_images:
            feats = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(is_image[..., None].expand_as(inputs_embeds), feats)
        return inputs_embeds, is_image

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        wings_record: dict | None = None,
        wings_token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`wings_record`: a dict that receives {layer: router weights [B, T, 2]} of this forward.
        `wings_token_mask` [B, T]: which of this forward's tokens are real, when `attention_mask` is a prepared
        4D mask (generate with a static cache passes both; without it, all are)."""
        if input_ids is None:
            raise ValueError("WingsForConditionalGeneration needs input_ids (image placeholders are found by id)")
        B, T = input_ids.shape
        inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds, is_image = self.merge_image_features(input_ids, inputs_embeds, pixel_values)
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        mask_2d = attention_mask if torch.is_tensor(attention_mask) and attention_mask.ndim == 2 else None
        if wings_token_mask is None:  # a prepared (4D) mask without it: every token of this forward is real
            wings_token_mask = mask_2d[:, -T:] if mask_2d is not None else torch.ones_like(input_ids)
        if position_ids is None:  # true positions: count real tokens, so left padding does not shift them
            if mask_2d is None:
                raise ValueError("with a prepared (4D) attention mask, pass `position_ids`")
            position_ids = (mask_2d.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        if labels is not None:
            labels = labels.masked_fill(is_image, -100)  # never predict image tokens
        if use_cache is None:
            use_cache = self.config.text_config.use_cache and not self.training
        if self.config.mode == "wings" and self.config.compat == "official":
            use_cache = use_cache_official(cache, use_cache)
        if use_cache and cache is None:  # (in both modes: its KV cache grows in place, see cache.py)
            from .cache import WingsDynamicCache

            cache = WingsDynamicCache(config=self.config.text_config)
        if self.config.mode == "wings":
            position_router = self.config.use_router and self.config.router_type == "position"
            state = build_state(
                inputs_embeds, is_image, wings_token_mask, position_ids, self.language_model.model.rotary_emb,
                cache_obj=cache if use_cache else None, router_impl=self.config.router_impl,
                kernels=self.wings_kernels, router_width=self.config.router_width if position_router else None,
            )
            if self.config.compat == "official":
                apply_official(state, inputs_embeds, is_image, wings_token_mask, position_ids,
                               self.language_model.model.rotary_emb, self.config)
            state.record = wings_record
            kwargs["wings_state"] = state
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # A cache class that keeps the learner cache in step (beams, crops); none at all in official compat.
        from .cache import prepare_generation_cache

        base = super()._prepare_cache_for_generation
        prepare_generation_cache(self, base, generation_config, model_kwargs, *args, **kwargs)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None,
                                      **model_kwargs):
        # pixel_values hold images, not samples: repeat each sample's images as a block (num_return_sequences).
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1:
            from .cache import expand_pixel_values

            pixel_values = expand_pixel_values(input_ids, pixel_values, expand_size, self.config.image_token_id,
                                               self.config.image_seq_length)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    def create_masks_for_generate(self, config: PreTrainedConfig, **kwargs) -> MaskForGenerate:
        # generate pre-builds the decoder's masks for a static cache: build them from the config the decoder itself
        # builds them from (a composed model's `text_config` copy may not carry the attention implementation).
        from transformers.masking_utils import create_masks_for_generate

        return create_masks_for_generate(getattr(self.language_model, "model", self.language_model).config, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, cache=None, pixel_values=None, is_first_iteration=False,
                                      **kwargs):
        mask_2d = kwargs.get("attention_mask")
        inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, is_first_iteration=is_first_iteration, **kwargs
        )
        prepared = inputs.get("attention_mask")
        if prepared is not None and not (torch.is_tensor(prepared) and prepared.ndim == 2):
            # A compilable (static) cache got a prepared 4D mask: hand over what the 2D one told (real tokens and
            # their true positions), sliced to this step so the compiled step sees fixed shapes. generate drops
            # an all-ones 2D mask: then every token is real.
            ids = inputs["input_ids"]
            if torch.is_tensor(mask_2d) and mask_2d.ndim == 2:
                if inputs.get("position_ids") is None:
                    inputs["position_ids"] = (mask_2d.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
                inputs["wings_token_mask"] = mask_2d[:, -ids.shape[1]:]
            else:
                inputs["wings_token_mask"] = torch.ones_like(ids)
        # Images enter once, with the prompt; later steps read them from the (learner) cache.
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs["pixel_values"] = pixel_values
        return inputs


def check_supported(config: WingsConfig) -> None:
    """Fail early, naming the model type, for backbones whose layout the code does not handle."""
    if config.vision_config.model_type not in SUPPORTED_VISION:
        raise ValueError(
            f"vision encoder type {config.vision_config.model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_VISION)}"
        )
    probe_layers = getattr(config.text_config, "num_hidden_layers", None)
    if probe_layers is None or not getattr(config.text_config, "is_decoder", True):
        raise ValueError(f"text model type {config.text_config.model_type!r} is not a decoder LLM")


__all__ = ["WingsForConditionalGeneration", "WingsPreTrainedModel", "decoder_layers"]
