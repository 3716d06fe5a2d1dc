"""The Wings router and the ways to feed it without materialising attention probabilities.

Per token, `(w_v, w_t) = softmax(SiLU(Linear(z)))`, where z summarises the head-summed main attention row:

- position router: z is the row itself over absolute key positions, so `Linear(z) = sum_k P[k] W[:, pos_k] + b`;
- segment router:  z is the attention mass on (image, text before the first image, text after an image) keys.

Both are `sum_h softmax(q_h K^T) @ U` for a per-key value matrix U ([S, 2] weight columns or [S, 3]
indicators). How the summary is obtained (`RouterProbe.attend`):

- value channels (default for SDPA, several queries): the main attention runs ONCE with `V' = [V | U | 0]` and
  Q, K zero-padded to the same head size; its extra output channels are the summary. A few % more attention
  FLOPs instead of a second T x S pass, O(T) memory, and the flash/memory-efficient kernels still apply;
- shared probabilities: an eager main attention returns its probabilities, and cached decoding (a few queries,
  many keys) computes the main attention as matmul-softmax-matmul; the probabilities feed the summary directly;
- separate pass (the reference, `WingsKernels.fused_router=False`): the stock kernel, then one more SDPA call
  whose values are U, or with `router_impl="eager"` the materialised probabilities.

A padding query (and any query that sees no key at all) gets a zero summary on every path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .few_queries import attention_scores, few_queries, weighted_values

# Segment ids of keys, shared by the segment router, the LAWS analysis and the learner cache.
SEG_PAD, SEG_TEXT_BEFORE, SEG_IMAGE, SEG_TEXT_AFTER = 0, 1, 2, 3
MAX_FUSED_HEAD_DIM = 256  # the largest head size the fused SDPA kernels take


class WingsRouter(nn.Module):
    """`softmax(SiLU(Linear(z)) / temperature)` -> [B, T, 2] weights for (visual, textual) learners.

    `router_mode` and `router_temperature` are read from the model's `WingsConfig` at every forward (bound by
    `bind_router_config`), so a saved model behaves as its config.json says and a config change takes effect at
    once. Unbound (a router built on its own), it is the paper's learned router at temperature 1. The "fixed"
    and "modality" modes are ablations: exact constant weights, the Linear kept but never read.
    """

    def __init__(self, router_type: str, width: int):
        super().__init__()
        self.router_type = router_type
        self.linear = nn.Linear(width, 2)
        self.wings_config = None  # a plain reference (not a submodule, not saved with the weights)

    @property
    def mode(self) -> str:
        return getattr(self.wings_config, "router_mode", "learned")

    @property
    def temperature(self) -> float:
        return float(getattr(self.wings_config, "router_temperature", 1.0))

    def value_matrix(self, key_positions: torch.Tensor, key_segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-key values U [B, S, C] such that `sum_h P_h @ U` is the router's pre-bias input."""
        if self.router_type == "segment":
            return segment_values(key_segments, dtype)
        return F.embedding(key_positions, self.linear.weight.t()).to(dtype)  # [B, S, 2]

    def forward(self, summary: torch.Tensor, has_image: torch.Tensor | None = None) -> torch.Tensor:
        """summary: [B, T, C] = sum_h P_h @ U -> weights [B, T, 2]. `has_image` [B] bool: which samples carry an
        image (needed by the modality mode only)."""
        mode = self.mode
        if mode == "fixed":
            return summary.new_full((*summary.shape[:-1], 2), 0.5)
        if mode == "modality":
            if has_image is None:
                raise ValueError("router_mode='modality' needs to know which samples carry an image (has_image)")
            w_v = has_image.to(summary.dtype)[:, None, None].expand(*summary.shape[:-1], 1)
            return torch.cat([w_v, 1.0 - w_v], dim=-1)
        if self.router_type == "segment":
            logits = self.linear(summary)
        else:  # the Linear's weight is already folded into U
            logits = summary + self.linear.bias
        logits = F.silu(logits.float())
        temperature = self.temperature
        if temperature != 1.0:
            logits = logits / temperature
        return torch.softmax(logits, dim=-1).to(summary.dtype)

    def anchor(self) -> torch.Tensor | None:
        """A zero that depends on every trainable router weight: the fixed and modality modes never read them, and
        DDP / ZeRO expect every trainable parameter to get a gradient each step. None when nothing trains."""
        params = [p for p in self.parameters() if p.requires_grad]
        return sum(p.sum() for p in params) * 0.0 if params else None


def bind_router_config(model: nn.Module, config) -> int:
    """Point every `WingsRouter` under `model` at `config` (its router_mode / router_temperature); returns how many."""
    routers = [m for m in model.modules() if isinstance(m, WingsRouter)]
    for router in routers:
        router.wings_config = config
    return len(routers)


def segment_values(key_segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] SEG_* ids -> [B, S, 3] indicators of (text before, image, text after); padding is all zero."""
    return F.one_hot(key_segments, num_classes=4)[..., 1:].to(dtype)


def check_router_width(width: int, key_positions: torch.Tensor) -> None:
    """The position router has one column per absolute position: refuse keys beyond it, naming both.
    A host-side check: a compiled step skips it (the column lookup itself still fails on a bad index)."""
    if key_positions.numel() == 0 or torch.compiler.is_compiling():
        return
    furthest = int(key_positions.max())
    if furthest >= width:
        raise ValueError(
            f"the position router has {width} columns but a key sits at position {furthest}; "
            "use router_type='segment' or a larger router_max_positions for longer sequences"
        )


def router_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, S] bool: causal on true positions, padding keys hidden (the main attention's probabilities)."""
    return (key_valid[:, None, :] & (key_positions[:, None, :] <= query_positions[:, :, None]))[:, None]


# Base kernels whose mask conventions the fused paths share: a 4-D [B, 1, T, S] tensor mask (bool for SDPA,
# additive for eager) or None for plain causal. Any other (flash: a 2-D [B, S] key mask; flex: a BlockMask; ...)
# runs as itself, followed by the reference router pass.
FUSABLE_BASES = ("sdpa", "eager")
# Kernel arguments that change the scores: the fused paths do not implement them.
SCORE_KWARGS = ("softcap", "s_aux", "sinks")


def router_probe_fusable(base_impl: str, attention_mask: object, kwargs: dict) -> bool:
    """Whether the router summary may come out of the main attention call itself (value channels, shared
    probabilities) rather than from a separate reference pass."""
    return (base_impl in FUSABLE_BASES
            and (attention_mask is None or (torch.is_tensor(attention_mask) and attention_mask.dim() == 4))
            and all(kwargs.get(name) is None for name in SCORE_KWARGS))


class RouterProbe:
    """Carries the router's per-key values into the attention function and its summary back out."""

    def __init__(self, values: torch.Tensor, mask_fn: Callable[[], torch.Tensor], impl: str, fused: bool = True,
                 plain_causal: Callable[[], bool] = lambda: False, padding_queries: torch.Tensor | None = None):
        self.values = values  # [B, S, C]
        self.padding_queries = padding_queries  # [B, T, 1] bool: they get a zero summary on every path
        self.mask_fn = mask_fn  # () -> [B, 1, T, S] router mask; only the reference paths build it
        self.impl = impl
        self.fused = fused
        self.plain_causal = plain_causal  # () -> bool: keys == queries at positions 0..T-1, all valid
        self.summary: torch.Tensor | None = None  # [B, T, C] once the attention ran

    def attend(self, base_impl: str, base_fn: Callable, module: nn.Module | None, query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, attention_mask: object, scaling: float | None, dropout: float,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's attention (as `base_fn` computes it) plus the router summary; returns base_fn's output.
        query [B, H, T, D], key/value [B, Hkv, S, D]; `attention_mask` as the base kernel takes it."""
        out = self._attend(base_impl, base_fn, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if self.padding_queries is not None:  # what a padding query "sees" depends on the kernel's mask conventions
            self.summary = self.summary.masked_fill(self.padding_queries, 0.0)
        return out

    def _attend(self, base_impl: str, base_fn, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if key.shape[2] != self.values.shape[1]:
            raise RuntimeError(f"router probe: attention saw {key.shape[2]} keys but the router has values for "
                               f"{self.values.shape[1]}; the learner cache is out of step with the KV cache")
        if self.fused and self.impl != "eager" and router_probe_fusable(base_impl, attention_mask, kwargs):
            if base_impl == "eager" and dropout == 0.0:  # the stock eager kernel returns its probabilities
                out, probs = base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs)
                self.summary = torch.matmul(probs.float().sum(dim=1), self.values.float()).to(query.dtype)
                return out, probs
            masked = attention_mask is None or attention_mask.dtype == torch.bool
            if few_queries(query, key) and masked:  # decoding with a cache
                return self._attend_sharing_probabilities(query, key, value, attention_mask, scale, dropout)
            padded = _padded_head_dim(query.shape[-1], self.values.shape[-1])
            if base_impl == "sdpa" and dropout == 0.0 and padded <= MAX_FUSED_HEAD_DIM:
                return self._attend_with_value_channels(base_fn, module, query, key, value, attention_mask, scale,
                                                        padded, **kwargs)
        out = base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        self.observe(query, key, scale)
        return out

    def _attend_with_value_channels(self, base_fn, module, query, key, value, attention_mask, scale, padded,
                                    **kwargs):
        """One SDPA call over `[V | U | 0]`, Q and K zero-padded to the same head size (the fused kernels need
        equal sizes; zero channels leave every score unchanged, and the scale stays the unpadded one)."""
        B, H, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        C = self.values.shape[-1]
        pad = padded - D
        u = F.pad(self.values.to(value.dtype), (0, pad - C))[:, None].expand(B, Hkv, S, pad)
        out, weights = base_fn(module, F.pad(query, (0, pad)), F.pad(key, (0, pad)), torch.cat([value, u], dim=-1),
                               attention_mask, scaling=scale, dropout=0.0, **kwargs)  # out: [B, T, H, D + pad]
        self.summary = out[..., D:D + C].sum(dim=2)  # [B, T, C]
        return out[..., :D], weights

    def _attend_sharing_probabilities(self, query, key, value, attention_mask, scale, dropout):
        """Decoding: matmul-softmax-matmul as HF's eager attention (fp32 softmax), grouped-query heads without
        repeating the cached keys; the head-summed probabilities give the summary, so the cache is read once
        instead of twice. (Equal to SDPA up to rounding, not bit for bit: only cached decoding takes it.)"""
        B, H, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        groups = H // Hkv
        scores = attention_scores(query.reshape(B, Hkv, groups * T, D), key, scale).view(B, Hkv, groups, T, S)
        if attention_mask is None and T > 1:  # SDPA's causal mask, aligned to the newest keys
            attention_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)[None, None]
        sees_any = None
        if attention_mask is not None:
            mask = attention_mask[:, :, None, :, -S:]  # [B, 1, 1, T, S]
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            sees_any = mask.any(dim=-1, keepdim=True)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # [B, Hkv, groups, T, S]
        if sees_any is not None:
            probs = probs * sees_any  # a query that sees nothing attends to nothing (as SDPA): 0, not uniform
        self.summary = torch.matmul(probs.sum(dim=(1, 2)), self.values.float()).to(query.dtype)  # [B, T, C]
        probs = probs.to(query.dtype)
        if dropout > 0:
            probs = F.dropout(probs, p=dropout)
        out = weighted_values(probs.view(B, Hkv, groups * T, S), value)  # [B, Hkv, groups * T, D]
        return out.view(B, H, T, D).transpose(1, 2).contiguous(), None

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """The reference: a second pass over query [B, H, T, D] and key [B, Hkv, S, D] -> self.summary."""
        B, H, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        groups = H // Hkv
        mask = self.mask_fn()
        sees_any = mask.any(dim=-1)[:, 0, :, None]  # [B, T, 1]
        mask = mask | ~sees_any[:, None]  # open empty (padding) rows so no kernel sees them; zeroed below
        # Decoding one token: the [B, H, 1, S] probabilities are tiny, so the eager path is the cheaper one.
        if self.impl == "eager" or T == 1:
            rep_key = key.repeat_interleave(groups, dim=1)
            scores = (query @ rep_key.transpose(-1, -2)).float() * scaling
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # [B, H, T, S]
            self.summary = (probs.sum(dim=1) @ self.values.float()).to(query.dtype) * sees_any
            return
        # The C value channels are zero-padded to head_dim so the fused (flash / memory-efficient) kernels
        # accept them: O(T) memory, where a 2-wide value would fall back to the O(T*S) math kernel.
        C = self.values.shape[-1]
        values = F.pad(self.values.to(query.dtype), (0, D - C)) if C < D else self.values.to(query.dtype)
        values = values[:, None].expand(B, Hkv, S, values.shape[-1])
        if S == T and self.plain_causal():  # no padding, no cache: the kernel's own causal mask is the same mask
            out = F.scaled_dot_product_attention(query, key, values, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(query, key, values, attn_mask=mask, scale=scaling, enable_gqa=True)
        self.summary = out[..., :C].sum(dim=1) * sees_any  # [B, T, C]


def _padded_head_dim(head_dim: int, channels: int) -> int:
    """head_dim + channels rounded up to a multiple of 8 (what the fused kernels accept)."""
    return -(-(head_dim + channels) // 8) * 8


def _router_attention(base_impl: str):
    """An attention function that runs `base_impl` and, when a probe is passed, fills the router summary."""
    base_fn = eager_attention_forward if base_impl == "eager" else ALL_ATTENTION_FUNCTIONS[base_impl]

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        probe: RouterProbe | None = kwargs.pop("wings_router_probe", None)
        if probe is None:
            return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return probe.attend(base_impl, base_fn, module, query, key, value, attention_mask, scaling, dropout, **kwargs)

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
