"""The Wings router and the trick that feeds it without materialising attention probabilities.

Per token, `(w_v, w_t) = softmax(SiLU(Linear(z)))`, where z summarises the head-summed main attention row:

- position router: z is the row itself over absolute key positions, so `Linear(z) = sum_k P[k] W[:, pos_k] + b`;
- segment router:  z is the attention mass on (image, text before the first image, text after an image) keys.

Both are `sum_h softmax(q_h K^T) @ U` for a per-key value matrix U ([S, 2] weight columns or [S, 3]
indicators), i.e. one extra SDPA call with a narrow value: O(T*S) time, O(T) memory, and the main
attention keeps SDPA/flash. `router_impl="eager"` materialises the probabilities instead (the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

# Segment ids of keys, shared by the segment router, the LAWS analysis and the learner cache.
SEG_PAD, SEG_TEXT_BEFORE, SEG_IMAGE, SEG_TEXT_AFTER = 0, 1, 2, 3


class WingsRouter(nn.Module):
    """`softmax(SiLU(Linear(z)))` -> [B, T, 2] weights for (visual, textual) learners."""

    def __init__(self, router_type: str, width: int):
        super().__init__()
        self.router_type = router_type
        self.linear = nn.Linear(width, 2)

    def value_matrix(self, key_positions: torch.Tensor, key_segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-key values U [B, S, C] such that `sum_h P_h @ U` is the router's pre-bias input."""
        if self.router_type == "segment":
            onehot = F.one_hot(key_segments, num_classes=4)[..., 1:]  # drop the padding segment
            return onehot.to(dtype)  # [B, S, 3]
        return self.linear.weight.t()[key_positions].to(dtype)  # [B, S, 2]

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        """summary: [B, T, C] = sum_h P_h @ U -> weights [B, T, 2]."""
        if self.router_type == "segment":
            logits = self.linear(summary)
        else:  # the Linear's weight is already folded into U
            logits = summary + self.linear.bias
        return torch.softmax(F.silu(logits.float()), dim=-1).to(summary.dtype)


def check_router_width(router: WingsRouter, key_positions: torch.Tensor) -> None:
    """The position router has one column per absolute position: refuse keys beyond it, naming both."""
    if router.router_type != "position" or key_positions.numel() == 0:
        return
    width = router.linear.in_features
    furthest = int(key_positions.max())
    if furthest >= width:
        raise ValueError(
            f"the position router has {width} columns but a key sits at position {furthest}; "
            "use router_type='segment' or a larger router_max_positions for longer sequences"
        )


def router_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, S] bool: causal on true positions, padding keys hidden (the main attention's probabilities)."""
    mask = key_valid[:, None, :] & (key_positions[:, None, :] <= query_positions[:, :, None])
    mask = mask | ~mask.any(dim=-1, keepdim=True)  # a fully hidden (padding) row must not give NaN
    return mask[:, None]


class RouterProbe:
    """Carries the router's per-key values into the attention function and its summary back out."""

    def __init__(self, values: torch.Tensor, mask: torch.Tensor, impl: str, plain_causal: bool = False):
        self.values = values  # [B, S, C]
        self.mask = mask  # [B, 1, T, S]
        self.impl = impl
        self.plain_causal = plain_causal  # keys == queries at positions 0..T-1, all valid
        self.summary: torch.Tensor | None = None  # [B, T, C] once the attention ran

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """query [B, H, T, D], key [B, Hkv, S, D] (RoPE applied, cache included) -> self.summary."""
        B, H, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        if S != self.values.shape[1]:
            raise RuntimeError(f"router probe: attention saw {S} keys but the router has values for "
                               f"{self.values.shape[1]}; the learner cache is out of step with the KV cache")
        groups = H // Hkv
        mask = self.mask
        if self.impl == "eager":
            rep_key = key.repeat_interleave(groups, dim=1)
            scores = (query @ rep_key.transpose(-1, -2)).float() * scaling
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # [B, H, T, S]
            self.summary = (probs.sum(dim=1) @ self.values.float()).to(query.dtype)
            return
        # The C value channels are zero-padded to head_dim so the fused (flash / memory-efficient) kernels
        # accept them: O(T) memory, where a 2-wide value would fall back to the O(T*S) math kernel.
        C = self.values.shape[-1]
        values = F.pad(self.values.to(query.dtype), (0, D - C)) if C < D else self.values.to(query.dtype)
        values = values[:, None].expand(B, Hkv, S, values.shape[-1])
        if self.plain_causal and S == T:  # no padding, no cache: the kernel's own causal mask is the same mask
            out = F.scaled_dot_product_attention(query, key, values, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(query, key, values, attn_mask=mask, scale=scaling, enable_gqa=True)
        self.summary = out[..., :C].sum(dim=1)  # [B, T, C]


def _router_attention(base_impl: str):
    """An attention function that runs `base_impl` and, when a probe is passed, fills the router summary."""
    base_fn = eager_attention_forward if base_impl == "eager" else ALL_ATTENTION_FUNCTIONS[base_impl]

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        probe: RouterProbe | None = kwargs.pop("wings_router_probe", None)
        out = base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if probe is not None:
            probe.observe(query, key, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out

    return forward


def router_attention_name(base_impl: str) -> str:
    """Register (once) and return the attention-interface name that wraps `base_impl` with the probe."""
    name = f"wings_router_{base_impl}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _router_attention(base_impl))
    return name


class RouterDispatchConfig:
    """Read-through view of the LLM config for one wrapped attention module.

    HF attention modules pick their kernel from `self.config._attn_implementation`; this view answers with
    the probe-carrying wrapper of whatever the real config says (sdpa, eager, flash...), so only the layers
    that have a router see it, the mask creation is untouched, and `set_attn_implementation` still works.
    """

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_config":  # copy/pickle probe before _config exists
            raise AttributeError(name)
        value = getattr(self._config, name)
        if name == "_attn_implementation":
            return router_attention_name(value or "eager")
        return value

    def __setattr__(self, name, value):
        setattr(self._config, name, value)
