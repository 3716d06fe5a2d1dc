"""The two forward pre-hooks that feed Wings on a stock VLM, without touching its forward code.

A stock `...ForConditionalGeneration.forward` embeds the tokens, splices the vision features in at the placeholder
positions (`masked_scatter`) and hands only `inputs_embeds` to its text model. Wings needs three things from that
path, which no single module sees:

- top level (`wings_top_hook`): which tokens are visual (from `input_ids`), the 2D attention mask (real tokens and
  their order) and an optional `wings_record` dict (router weights, for analysis); kept on the model until
- the text model (`wings_text_hook`) receives the merged `inputs_embeds`, the position ids and the cache: it builds
  the `WingsState` (learner features = the merged layer-0 embeddings, split by kind) and passes it down as the
  `wings_state` kwarg, which reaches every decoder layer and attention (modeling/attention.py takes it from there).

Positions. The learners' keys must rotate exactly as the main attention rotates the same tokens, while their
causal masks and caches need the tokens' order. For 1D RoPE both come from the position ids the text model uses
(`arange + past` in a plain forward, `cumsum(mask) - 1` in `generate`); for M-RoPE (Qwen-VL) the rotary ids are
`[3, B, T]` (`[4, B, T]` with the text order as row 0 in `generate`) and the order is row 0, else the mask's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from ..modeling.cache import WingsDynamicCache, upgrade_cache
from ..modeling.state import build_state
from .registry import visual_mask

CONTEXT = "_wings_context"


@dataclass
class CallContext:
    """What the top-level forward knows and the text model's forward needs (one forward's worth)."""

    is_visual: torch.Tensor | None  # [B, T] bool, None when the call carried no ids (the text model decides)
    mask_2d: torch.Tensor | None  # [B, past + T] 1 = real token, None = all real
    record: dict | None  # receives {layer: router weights [B, T, 2]}


def _cache_of(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def wings_top_hook(model: nn.Module, args: tuple, kwargs: dict):
    """Pre-hook on the top-level model: note the visual tokens and the mask for this forward's text model call."""
    record = kwargs.pop("wings_record", None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    mask_2d = mask if torch.is_tensor(mask) and mask.ndim == 2 else None
    if mask is not None and mask_2d is None:
        raise ValueError("Wings on a stock VLM needs the 2D attention mask (1 = real token), not a prepared 4D one; "
                         "decode with the default dynamic cache (cache_implementation='static' is not supported)")
    cache = _cache_of(kwargs)
    if isinstance(cache, StaticCache):
        raise ValueError("Wings on a stock VLM decodes with a dynamic cache; cache_implementation='static' is not "
                         "supported for attached models")
    if isinstance(cache, DynamicCache):
        upgrade_cache(cache)  # beams, batch selection and crops then reach the learner cache too
    is_visual = None
    if ids is not None:
        is_visual = visual_mask(ids, model._wings_visual_ids)
    elif kwargs.get("inputs_embeds") is not None:  # placeholders are found by their embedding, as the stock model does
        embeds = kwargs["inputs_embeds"]
        table = model.get_input_embeddings()
        rows = table(torch.tensor(model._wings_visual_ids, device=embeds.device)).to(embeds.dtype)  # [k, d]
        is_visual = (embeds[:, :, None, :] == rows).all(-1).any(-1)
    model.__dict__[CONTEXT] = CallContext(is_visual, mask_2d, record)
    return args, kwargs


def clear_context(model: nn.Module, *_args) -> None:
    """Forward hook (always called, errors included): a context never outlives its forward."""
    model.__dict__.pop(CONTEXT, None)


OWNER = "_wings_owner"  # the text model's reference to its top-level model (in __dict__: not a submodule)


def wings_text_hook(text_model: nn.Module, args: tuple, kwargs: dict):
    """Pre-hook on the text model: build this forward's `WingsState` and pass it down as `wings_state`.

    The top-level model (which carries the settings and the context) is found through `text_model.__dict__`, not
    a closure, so a deep copy of the whole model hooks up with its own copy."""
    owner = text_model.__dict__[OWNER]
    context: CallContext | None = owner.__dict__.pop(CONTEXT, None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:  # the text model called on its own, with ids: embed here, as it would
        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], args[1:]
        if ids is None:
            return None
        embeds = kwargs["inputs_embeds"] = text_model.get_input_embeddings()(ids)
        kwargs["input_ids"] = None
        context = CallContext(visual_mask(ids, owner._wings_visual_ids), kwargs.get("attention_mask"), None)
    B, T = embeds.shape[:2]
    cache = _cache_of(kwargs)
    if cache is None and kwargs.get("use_cache"):  # what the text model would create, learner-aware
        cache = kwargs["cache"] = WingsDynamicCache(config=text_model.config)
    elif isinstance(cache, DynamicCache):
        upgrade_cache(cache)
    past = cache.get_seq_length() if cache is not None else 0
    mask_2d = context.mask_2d if context is not None else None
    token_mask = mask_2d[:, -T:].bool() if mask_2d is not None else torch.ones(B, T, dtype=torch.bool,
                                                                                device=embeds.device)
    order, rope = split_positions(kwargs.get("position_ids"), mask_2d, past, B, T, owner._wings_mrope, embeds.device)
    is_visual = context.is_visual if context is not None and context.is_visual is not None else None
    if is_visual is None:
        is_visual = torch.zeros(B, T, dtype=torch.bool, device=embeds.device)
    if tuple(is_visual.shape) != (B, T):
        raise RuntimeError(f"Wings: the text model got {T} tokens but the top-level call had "
                           f"{is_visual.shape[-1]}; this model type changes the sequence between the two")
    spec = owner._wings_spec
    position_router = spec.use_router and spec.router_type == "position"
    state = build_state(
        embeds, is_visual, token_mask, order, text_model.rotary_emb, cache_obj=cache,
        router_impl=spec.router_impl, kernels=owner.wings_kernels,
        router_width=spec.router_width if position_router else None, rope_ids=rope,
    )
    state.record = context.record if context is not None else None
    kwargs["wings_state"] = state
    return args, kwargs


def split_positions(position_ids: torch.Tensor | None, mask_2d: torch.Tensor | None, past: int, B: int, T: int,
                    mrope: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(order [B, T], rotary ids or None): the tokens' order for masks and caches, and the ids the text model
    rotates them with when those are not the order itself (see the module docstring)."""
    if position_ids is not None and position_ids.ndim == 3:  # M-RoPE ids: [3, B, T], or [4, B, T] = text order + 3D
        if position_ids.shape[0] == 4:
            return position_ids[0].expand(B, T), position_ids[1:].expand(-1, B, T)
        return _order(mask_2d, past, B, T, device), position_ids.expand(-1, B, T)
    if position_ids is not None:  # [B, T] (or [1, T]): the text model rotates with these (3 equal rows for M-RoPE)
        order = position_ids.expand(B, T)
        return order, (order[None].expand(3, B, T) if mrope else None)
    # None: the text model uses `arange + past` for every row (also for M-RoPE, as 3 equal rows); with left padding
    # that is not the order of the real tokens, so rotate with it but order by the mask.
    rope = (torch.arange(T, device=device) + past).expand(B, T)
    order = _order(mask_2d, past, B, T, device)
    return order, (rope[None].expand(3, B, T) if mrope else rope)


def _order(mask_2d: torch.Tensor | None, past: int, B: int, T: int, device: torch.device) -> torch.Tensor:
    if mask_2d is None:
        return (torch.arange(T, device=device) + past).expand(B, T)
    return (mask_2d.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
