"""Attach Wings learners to any HF decoder LLM (hooks on its attention modules), and take them off again."""

from __future__ import annotations

from torch import nn

from .attention import WINGS_PARTS, attach_wings, detach_wings, is_wings_attention

SUPPORTED_DECODERS = ("qwen2", "llama", "mistral", "qwen3")


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a `*ForCausalLM` (model.layers) or a headless decoder (layers)."""
    body = getattr(llm, "model", llm)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(llm).__name__} has no `model.layers` decoder list; Wings supports decoder LLMs of the "
            f"families {', '.join(SUPPORTED_DECODERS)} and others with the same layout"
        )
    return layers


def learner_heads(text_config) -> tuple[int, int]:
    """(heads, head_dim) of the learners: the LLM's head_dim, heads = hidden // head_dim (identity terms need it)."""
    hidden = text_config.hidden_size
    head_dim = getattr(text_config, "head_dim", None) or hidden // text_config.num_attention_heads
    if hidden % head_dim:
        raise ValueError(
            f"{text_config.model_type}: hidden_size {hidden} is not a multiple of head_dim {head_dim}; "
            "LoRRA learners cannot use the LLM's head size"
        )
    return hidden // head_dim, head_dim


def _pass_residual(module: nn.Module, args: tuple, kwargs: dict):
    """Decoder-layer pre-hook: hand the layer input h to the wrapped attention as `wings_residual`."""
    if kwargs.get("wings_state") is None:
        return None
    kwargs["wings_residual"] = args[0] if args else kwargs["hidden_states"]
    return args, kwargs


def inject_learners(llm: nn.Module, wings_config) -> list[nn.Module]:
    """Attach fresh learners (and a router) to each learner layer's attention: the LLM's output is unchanged."""
    text_config = wings_config.text_config
    layers = decoder_layers(llm)
    if getattr(getattr(llm, "model", llm), "rotary_emb", None) is None:
        raise ValueError(f"{type(llm).__name__} has no rotary embedding (`model.rotary_emb`); Wings learners need RoPE")
    heads, head_dim = learner_heads(text_config)
    attached = []
    for idx in wings_config.learner_layer_indices:
        layer = layers[idx]
        ref = next(layer.self_attn.parameters())  # learners follow the attention's device and dtype
        attn = attach_wings(
            layer.self_attn, idx, text_config.hidden_size, heads, head_dim, wings_config.learner_rank,
            use_visual=wings_config.use_visual_learner,
            use_textual=wings_config.use_textual_learner,
            router_type=wings_config.router_type if wings_config.use_router else None,
            router_width=wings_config.router_width,
        )
        for part in WINGS_PARTS:
            if hasattr(attn, part):
                getattr(attn, part).to(device=ref.device, dtype=ref.dtype)
        if hasattr(attn, "router"):
            attn.router.wings_config = wings_config  # it reads router_mode / router_temperature from here
        layer._wings_hook = layer.register_forward_pre_hook(_pass_residual, with_kwargs=True)
        attached.append(attn)
    return attached


def detach_learners(llm: nn.Module) -> nn.Module:
    """Remove every Wings part and hook; the LLM is then exactly the base model again."""
    for layer in decoder_layers(llm):
        if is_wings_attention(layer.self_attn):
            detach_wings(layer.self_attn)
            hook = getattr(layer, "_wings_hook", None)
            if hook is not None:
                hook.remove()
                del layer._wings_hook
    return llm


def wings_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules that carry Wings parts."""
    return [m for m in model.modules() if is_wings_attention(m)]
