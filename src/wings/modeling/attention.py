"""Wings parts of one decoder layer, attached to the layer's own attention module by hooks.

The decoder layer computes `h' = h + self_attn(LN1(h))`. A forward hook on `self_attn` returns
`attn + delta` with `delta = w_v * Vis(h') + w_t * Txt(h')`, so the layer's own residual add yields
`h'' = h' + delta` exactly once, whatever the decoder family. `h` (the layer input) reaches the hook as the
`wings_residual` kwarg, put there by a pre-hook on the decoder layer (see inject.py).

The learners and router are registered as children of the original attention module (`self_attn.visual`,
`self_attn.textual`, `self_attn.router`), so the base LLM's own weights keep their stock names
(`self_attn.q_proj.weight`, ...) in every mode: a llava checkpoint loads into a wings model and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import compat
from .grouped import grouped_attention
from .kernels import recompute_context
from .learner import (
    LoRRALearner,
    additive_mask,
    as_dtype,
    autocast_input,
    concatenated,
    head_broadcast,
    learner_mask,
    plus_low_rank_pair,
)
from .router import RouterDispatchConfig, RouterProbe, WingsRouter, router_mask
from .state import WingsState

WINGS_PARTS = ("visual", "textual", "router")
LEARNER_KINDS = ("visual", "textual")


def attach_wings(attn: nn.Module, layer_idx: int, hidden_size: int, num_heads: int, head_dim: int, rank: int,
                 use_visual: bool, use_textual: bool, router_type: str | None, router_width: int) -> nn.Module:
    """Give `attn` fresh learners (zero output) and, optionally, a router; return `attn` itself."""
    if is_wings_attention(attn):
        raise ValueError(f"decoder layer {layer_idx} already carries Wings learners")
    if use_visual:
        attn.visual = LoRRALearner(hidden_size, num_heads, head_dim, rank)
    if use_textual:
        attn.textual = LoRRALearner(hidden_size, num_heads, head_dim, rank)
    if router_type is not None:
        attn.router = WingsRouter(router_type, router_width)
        attn.config = RouterDispatchConfig(attn.config)  # route this layer's kernel through the probe
    attn.wings_layer_idx = layer_idx
    attn._wings_hooks = (
        attn.register_forward_pre_hook(_before_attention, with_kwargs=True),
        attn.register_forward_hook(_after_attention, with_kwargs=True),
    )
    return attn


def detach_wings(attn: nn.Module) -> nn.Module:
    """Remove the learners, router and hooks; `attn` is then the stock module again."""
    for handle in getattr(attn, "_wings_hooks", ()):
        handle.remove()
    for name in (*WINGS_PARTS, "_wings_hooks", "wings_layer_idx", "_wings_call"):
        if hasattr(attn, name):
            delattr(attn, name)
    if isinstance(attn.config, RouterDispatchConfig):
        attn.config = attn.config._config
    return attn


def is_wings_attention(attn: nn.Module) -> bool:
    return hasattr(attn, "_wings_hooks")


def _before_attention(attn: nn.Module, args: tuple, kwargs: dict):
    """Take the Wings kwargs out of the call (kernels never see them) and hand the router its probe."""
    state: WingsState | None = kwargs.pop("wings_state", None)
    residual = kwargs.pop("wings_residual", None)
    if state is None:  # called outside a Wings forward: behave as the base attention
        attn._wings_call = None
        return args, kwargs
    probe = _make_probe(attn, state)
    if probe is not None:
        kwargs["wings_router_probe"] = probe
    if "query_rope" not in state.memo:  # the LLM's RoPE tables of this forward, shaped for the heads once
        state.memo["query_rope"] = head_broadcast(*kwargs["position_embeddings"])
    attn._wings_call = (state, residual, probe, state.memo["query_rope"])
    return args, kwargs


def _after_attention(attn: nn.Module, args: tuple, kwargs: dict, output):
    call = attn._wings_call
    attn._wings_call = None
    if call is None:
        return None
    state, residual, probe, query_rope = call
    attn_out, attn_weights = output[0], output[1]
    delta = learner_delta(attn, residual + attn_out, state, query_rope, probe)  # learners read h'
    return (attn_out + as_dtype(delta, attn_out.dtype), attn_weights, *output[2:])


def _make_probe(attn: nn.Module, state: WingsState) -> RouterProbe | None:
    router = getattr(attn, "router", None)
    if router is None:
        return None
    if (not state.any_image and state.record is None and state.compat_official is None
            and not (attn.training and torch.is_grad_enabled())):
        # No sample has an image: every token keeps the textual learner at full weight whatever the router says,
        # so the main attention runs as the stock kernel (exactly the base model's numbers, and cheaper). With a
        # cache the router's per-key values still grow with the keys, for a later forward that needs them.
        if state.cache is not None:
            state.router_values(attn.wings_layer_idx, router)
        return None

    def mask_fn() -> torch.Tensor:  # the reference paths' mask, shared by every layer of this forward
        if "probe_mask" not in state.memo:
            state.memo["probe_mask"] = router_mask(state.query_positions, state.key_positions, state.key_valid)
        return state.memo["probe_mask"]

    values = state.router_values(attn.wings_layer_idx, router)
    if "padding_queries" not in state.memo:  # [B, T, 1]: the queries whose summary is zeroed
        no_padding = state.query_valid is None or state.all_queries_valid
        state.memo["padding_queries"] = None if no_padding else ~state.query_valid[..., None]
    return RouterProbe(values, mask_fn, state.router_impl, fused=state.kernels.fused_router,
                       plain_causal=state.plain_causal, padding_queries=state.memo["padding_queries"])


def learner_delta(attn: nn.Module, hidden: torch.Tensor, state: WingsState, query_rope, probe: RouterProbe | None):
    """hidden: h' [B, T, d] -> w_v * Vis(h') + w_t * Txt(h') (or their plain sum without a router)."""
    layer_idx = attn.wings_layer_idx
    learners = {kind: getattr(attn, kind) for kind in LEARNER_KINDS if getattr(attn, kind, None) is not None}
    # Under autocast the learners run in the autocast dtype: cast h' once, here, so that what the backward keeps of
    # it (the checkpoint's input below, or the query down-projection's input) is the narrow copy, never fp32 h'.
    hidden = autocast_input(hidden)
    if state.kernels.learner_recompute and attn.training and torch.is_grad_enabled() and state.cache is None:
        # Keep only h' (and the shared key features; with "projections" also the attention outputs) for the
        # backward; the learners run again there.
        low = checkpoint(_learner_outputs, attn, learners, hidden, state, query_rope, use_reentrant=False,
                         context_fn=recompute_context(state.kernels.learner_recompute))
    else:
        low = _learner_outputs(attn, learners, hidden, state, query_rope)
    # A learner without keys (e.g. the visual one in a text-only batch) is skipped; in training its parameters
    # stay in the graph through a zero anchor (DDP/ZeRO expect every parameter to get a gradient).
    anchors = [learners[kind].anchor() for kind, a in low.items() if a is None and attn.training]
    low = {kind: a for kind, a in low.items() if a is not None}
    w_vis = w_txt = None
    router = getattr(attn, "router", None)
    if router is not None and probe is not None:
        if probe.summary is None:
            raise RuntimeError(
                f"layer {layer_idx}: the router got no attention summary; the attention kernel did not run "
                "through the Wings dispatcher (was the attention module's config replaced after injection?)"
            )
        weights = router(probe.summary, state.has_image)  # [B, T, 2]
        if router.mode != "learned" and attn.training:  # the ablation modes read no router weight
            anchor = router.anchor()
            anchors += [] if anchor is None else [anchor]
        if state.record is not None:
            state.record[layer_idx] = weights.detach()
        if state.compat_official is not None:  # the released model's double add (compat.py)
            outs = {kind: learners[kind].o_proj.up(a) for kind, a in low.items()}
            return _plus(compat.combine(outs.get("visual"), outs.get("textual"), weights, state), anchors)
        # A sample without any image skips the visual learner and keeps the textual learner at full weight.
        w_vis = weights[..., :1]
        w_txt = weights[..., 1:]
        if not state.all_have_image:
            w_txt = torch.where(state.has_image[:, None, None], w_txt, torch.ones_like(w_txt))
    scales = {"visual": w_vis, "textual": w_txt}
    if not low:
        return _plus(torch.zeros_like(hidden), anchors)
    if state.kernels.fused_lowrank and len(low) == 2:
        # w_v B_v a_v + w_t B_t a_t = [w_v a_v | w_t a_t] @ [B_v | B_t]^T: one matmul with 2r inner channels, the
        # router weights applied to r channels instead of d.
        scaled = [a if scales[kind] is None else a * as_dtype(scales[kind], a.dtype) for kind, a in low.items()]
        owner = learners[next(iter(low))]  # the pair's weights are kept on its first learner
        up = concatenated(owner, "o_up", [learners[kind].o_proj.up.weight for kind in low], dim=1)  # [d, 2r]
        return _plus(F.linear(torch.cat(scaled, dim=-1), up), anchors)
    delta = None
    for kind, a in low.items():
        out = learners[kind].o_proj.up(a)
        out = out if scales[kind] is None else scales[kind] * out
        delta = out if delta is None else delta + out
    return _plus(delta, anchors)


def _plus(delta: torch.Tensor, anchors: list[torch.Tensor]) -> torch.Tensor:
    return delta + sum(anchors) if anchors else delta


def _learner_outputs(attn: nn.Module, learners: dict[str, LoRRALearner], hidden: torch.Tensor, state: WingsState,
                     query_rope) -> dict[str, torch.Tensor | None]:
    """{kind: the learner's output before its up-projection [B, T, r]}, None for a learner with no keys."""
    keys = {kind: state.learner_keys(attn.wings_layer_idx, kind, learner) for kind, learner in learners.items()}
    running = [kind for kind in learners if keys[kind] is not None]
    outs: dict[str, torch.Tensor | None] = {kind: None for kind in learners}
    grouping = state.grouping if state.compat_official is None else None
    if grouping is not None:  # queries grouped by token kind (grouped.py): rows instead of tokens until the end
        hidden, query_rope = grouping.rows(hidden), grouping.rope
    if len(running) == 2 and state.kernels.fused_lowrank:
        # Both queries read h' and share heads and positions: one down matmul, one batched up matmul (identity
        # folded in), one RoPE over the stacked pair.
        stacked = plus_low_rank_pair(hidden, *(learners[k].q_proj for k in running), True, learners[running[0]], "q")
        queries = dict(zip(running, learners[running[0]].queries(stacked, query_rope), strict=True))
    else:
        queries = {kind: learners[kind].queries(hidden + learners[kind].q_proj(hidden), query_rope)
                   for kind in running}
    for kind in running:
        if grouping is not None:
            low = grouped_attention(learners[kind], kind, queries[kind], keys[kind], grouping, state.memo)
            outs[kind] = grouping.tokens(low)  # [B, T, r]
            continue
        if state.compat_official is not None:
            mask = compat.learner_mask(kind, keys[kind], state.query_positions)
        else:  # every layer's keys of one kind share positions and validity: build the mask once per forward
            if kind not in state.memo:
                safe, sees_any = learner_mask(keys[kind], state.query_positions)
                state.memo[kind] = (additive_mask(safe, queries[kind].dtype), sees_any.to(queries[kind].dtype))
            mask = state.memo[kind]
        outs[kind] = learners[kind].attend(queries[kind], keys[kind], mask)
    return outs
