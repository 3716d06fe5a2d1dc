"""`WingsAttention`: wraps one decoder layer's attention and adds the router-weighted learner outputs.

The decoder layer computes `h' = h + self_attn(LN1(h))`. The wrapper returns `attn + delta` with
`delta = w_v * Vis(h') + w_t * Txt(h')`, so the layer's own residual add yields `h'' = h' + delta`
exactly once, whatever the decoder family. `h` (the layer input) reaches the wrapper as the
`wings_residual` kwarg, put there by a pre-hook on the decoder layer (see inject.py).
"""

from __future__ import annotations

import torch
from torch import nn

from . import compat
from .learner import LoRRALearner
from .router import RouterDispatchConfig, RouterProbe, WingsRouter
from .state import WingsState


class WingsAttention(nn.Module):
    """The original attention (`base_attn`, untouched) plus this layer's learners and router."""

    def __init__(self, base_attn: nn.Module, layer_idx: int, hidden_size: int, num_heads: int, head_dim: int,
                 rank: int, use_visual: bool, use_textual: bool, router_type: str | None, router_width: int):
        super().__init__()
        self.base_attn = base_attn
        self.layer_idx = layer_idx
        self.visual = LoRRALearner(hidden_size, num_heads, head_dim, rank) if use_visual else None
        self.textual = LoRRALearner(hidden_size, num_heads, head_dim, rank) if use_textual else None
        self.router = WingsRouter(router_type, router_width) if router_type is not None else None
        if self.router is not None and not isinstance(base_attn.config, RouterDispatchConfig):
            base_attn.config = RouterDispatchConfig(base_attn.config)

    def unwrap(self) -> nn.Module:
        """Return the original attention module with its original config (used by `detach_learners`)."""
        if isinstance(self.base_attn.config, RouterDispatchConfig):
            self.base_attn.config = self.base_attn.config._config
        return self.base_attn

    def forward(self, *args, wings_state: WingsState | None = None, wings_residual: torch.Tensor | None = None,
                **kwargs):
        if wings_state is None:  # called outside a Wings forward: behave as the base attention
            return self.base_attn(*args, **kwargs)
        probe = self._make_probe(wings_state)
        attn_out, attn_weights = self.base_attn(*args, wings_router_probe=probe, **kwargs)
        hidden = wings_residual + attn_out  # h'
        delta = self.learner_delta(hidden, wings_state, kwargs["position_embeddings"], probe)
        return attn_out + delta.to(attn_out.dtype), attn_weights

    def _make_probe(self, state: WingsState) -> RouterProbe | None:
        if self.router is None:
            return None
        values = self.router.value_matrix(state.key_positions, state.key_segments, self.router.linear.weight.dtype)
        return RouterProbe(values, state.query_positions, state.key_positions, state.key_valid, state.router_impl,
                           plain_causal=state.plain_causal)

    def learner_delta(self, hidden: torch.Tensor, state: WingsState, query_rope, probe: RouterProbe | None):
        """hidden: h' [B, T, d] -> w_v * Vis(h') + w_t * Txt(h') (or their plain sum without a router)."""
        outs = {}
        for kind, learner in (("visual", self.visual), ("textual", self.textual)):
            if learner is None:
                continue
            keys = state.learner_keys(self.layer_idx, kind, learner)
            if keys is None:  # e.g. a text-only batch for the visual learner
                outs[kind] = learner.anchor() if self.training else None
                continue
            mask = None if state.compat_official is None else compat.learner_mask(kind, keys, state.query_positions)
            outs[kind] = learner(hidden, state.query_positions, query_rope, keys, mask=mask)
        vis, txt = outs.get("visual"), outs.get("textual")
        if self.router is None or probe is None:
            return sum(o for o in (vis, txt) if o is not None) if (vis is not None or txt is not None) else 0.0
        if probe.summary is None:
            raise RuntimeError(
                f"layer {self.layer_idx}: the router got no attention summary; the attention kernel did not run "
                "through the Wings dispatcher (was the attention module replaced after injection?)"
            )
        weights = self.router(probe.summary)  # [B, T, 2]
        if state.record is not None:
            state.record[self.layer_idx] = weights.detach()
        if state.compat_official is not None:  # the released model's double add (compat.py)
            return compat.combine(vis, txt, weights, state)
        # A sample without any image skips the visual learner and keeps the textual learner at full weight.
        w_vis = weights[..., :1]
        w_txt = torch.where(state.has_image[:, None, None], weights[..., 1:], torch.ones_like(weights[..., 1:]))
        delta = torch.zeros_like(hidden) if txt is None else w_txt * txt
        if vis is not None:
            delta = delta + w_vis * vis
        return delta
