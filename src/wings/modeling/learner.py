"""LoRRA (Low-Rank Residual Attention): the visual and textual learners of Wings.

    Q = x + B_q A_q x        x: the layer's post-attention residual stream h'      [B, T, d]
    K = f + B_k A_k f        f: the learner's features (image or text embeddings)  [B, N, d]
    V = f + B_v A_v f
    O = B_o A_o MHA(Q, K, V)     no identity term on O, so a fresh learner (B = 0) outputs exactly 0

Attention is causal on *true* positions (a query at position p sees keys at positions <= p) and RoPE uses
the LLM's own rotary embedding at those positions. A query that sees no key gets 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init

from .few_queries import few_queries, few_query_attention


class LowRankLinear(nn.Module):
    """`up(down(x))` with rank r; `down ~ trunc_normal(0.02)` and `up = 0`, so it starts as the zero map."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # HF's init helpers skip tensors already loaded from a checkpoint (`_is_hf_initialized`).
        hf_init.trunc_normal_(self.down.weight, std=0.02)
        hf_init.zeros_(self.up.weight)  # zero-init: a fresh learner leaves the LLM unchanged
        # Keep the LLM's own `_init_weights` (which would draw N(0, 0.02) for any Linear) off these two.
        self.down._is_hf_initialized = True
        self.up._is_hf_initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


KEPT = "_wings_kept"  # the attribute of a learner that holds its kept weights


class KeptWeights(dict):
    """name -> (sources, built): weights built from other weights, and what they were built from. A copy or a
    pickle of the module starts empty (its tensors are new: nothing kept would match them)."""

    def __deepcopy__(self, memo) -> KeptWeights:
        return KeptWeights()

    def __reduce__(self):
        return KeptWeights, ()


def kept(owner: nn.Module | None, name: str, weights: list[torch.Tensor],
         build: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """`build(weights)` (a concatenation of weights), kept on `owner` between forwards that record no gradient
    (inference), so that a decoding step neither copies the weights nor pays the calls.

    Only without autograd: a forward that records gradients builds afresh (it must differentiate through the
    concatenation, and must never save a tensor built under `torch.inference_mode`). A kept entry is used only
    while each weight is the same tensor object, over the same storage (a detached alias is kept with the entry,
    so that storage cannot be freed and its address reused), at the same version (in-place updates: optimizer
    steps, `load_state_dict`), shape, dtype and device. `LoRRALearner` also drops its entries on `train()`, on
    `.to()` & co. and on `load_state_dict`. Not under torch.distributed: sharding engines (FSDP, ZeRO-3) refill
    parameter storage in place without bumping the version."""
    if (owner is None or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or any(w.is_inference() for w in weights) or _distributed()):
        return build(weights)
    store = owner.__dict__.get(KEPT)
    if store is None:
        store = owner.__dict__[KEPT] = KeptWeights()
    entry = store.get(name)
    if entry is None or not _same_sources(entry[0], weights):
        entry = store[name] = ([(w, w.detach(), w._version) for w in weights], build(weights))
    return entry[1]


def _same_sources(sources: list[tuple[torch.Tensor, torch.Tensor, int]], weights: list[torch.Tensor]) -> bool:
    return len(sources) == len(weights) and all(
        held is w and alias.data_ptr() == w.data_ptr() and version == w._version and alias.shape == w.shape
        and alias.stride() == w.stride() and alias.dtype == w.dtype and alias.device == w.device
        for (held, alias, version), w in zip(sources, weights, strict=True))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def drop_kept(module: nn.Module, *_) -> None:
    """Forget `module`'s kept weights (a `load_state_dict` post-hook too, hence the ignored arguments)."""
    module.__dict__.pop(KEPT, None)


def concatenated(owner: nn.Module | None, name: str, weights: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return kept(owner, name, weights, lambda w: torch.cat(w, dim))


def plus_low_rank_pair(x: torch.Tensor, first: LowRankLinear, second: LowRankLinear, fused: bool,
                       owner: nn.Module | None = None, name: str = "") -> torch.Tensor | tuple[torch.Tensor, ...]:
    """(x + first(x), x + second(x)), two low-rank maps of the same input.

    Fused: a [2, *x.shape] tensor from ONE down-projection matmul (both downs stacked, [2r, d]) and ONE batched
    up-projection with the identity term folded in (`baddbmm`); reference: a tuple of two separate computations.
    `owner`/`name`: where the stacked weights may be kept between inference forwards."""
    if not fused:
        return x + first(x), x + second(x)
    d, rank = x.shape[-1], first.down.out_features
    down = kept(owner, f"{name}/down", [first.down.weight, second.down.weight], torch.cat)  # [2r, d]
    up = kept(owner, f"{name}/up", [first.up.weight, second.up.weight],
              lambda w: torch.stack([w[0].t(), w[1].t()]))  # [2, r, d]
    flat = x.reshape(-1, d)
    low = F.linear(flat, down).view(-1, 2, rank).transpose(0, 1)  # [2, N, r]
    both = torch.baddbmm(flat.unsqueeze(0).expand(2, -1, -1), low, up.to(low.dtype))  # [2, N, d]
    return both.view(2, *x.shape)


@dataclass
class LearnerKeys:
    """Keys/values of one learner in one layer, after projection and RoPE, ready for attention (a view: a cache
    keeps the storage, see state.LearnerCache)."""

    key: torch.Tensor  # [B, H, N, hd]
    value: torch.Tensor  # [B, H, N, hd]
    positions: torch.Tensor  # [B, N] true sequence positions
    valid: torch.Tensor  # [B, N] bool; False for padding slots


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., B, H, N, hd]; cos/sin: [B, N, hd] from the LLM's rotary embedding at the tokens' true positions,
    or already [B, 1, N, hd] (`head_broadcast`)."""
    if cos.dim() == 3:
        cos, sin = head_broadcast(cos, sin)
    cos, sin = as_dtype(cos, x.dtype), as_dtype(sin, x.dtype)
    return torch.addcmul(x * cos, rotate_half(x), sin)


def head_broadcast(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [B, N, hd] -> [B, 1, N, hd], ready to broadcast over heads (done once per forward)."""
    return cos.unsqueeze(1), sin.unsqueeze(1)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)` without the call when it already is (decoding pays per op, not per FLOP)."""
    return x if x.dtype == dtype else x.to(dtype)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, run the learner's identity terms in the autocast dtype, as the main attention's own
    projections are: one cast, where fp32 master activations would otherwise cost an fp32 add, RoPE in fp32
    and a fresh cast in every low-rank linear."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def open_empty_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [B, T, N] -> (SDPA-safe mask [B, 1, T, N], sees_any [B, T, 1]).

    SDPA returns NaN for a row with no visible key on some kernels: such rows are opened here and their output
    zeroed after.
    """
    sees_any = mask.any(dim=-1, keepdim=True)
    return (mask | ~sees_any)[:, None], sees_any


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (True = visible) -> 0 / -inf in `dtype`, what SDPA turns a bool mask into at every call."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def learner_mask(keys: LearnerKeys, query_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal on true positions: a query at p sees valid keys at positions <= p."""
    return open_empty_rows(keys.valid[:, None, :] & (keys.positions[:, None, :] <= query_positions[:, :, None]))


class LoRRALearner(nn.Module):
    """One Wings learner (visual or textual) of one decoder layer."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, rank: int):
        super().__init__()
        if num_heads * head_dim != hidden_size:
            raise ValueError(
                f"LoRRA needs num_heads * head_dim == hidden_size for its identity terms, "
                f"got {num_heads} * {head_dim} != {hidden_size}"
            )
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = LowRankLinear(hidden_size, hidden_size, rank)
        self.k_proj = LowRankLinear(hidden_size, hidden_size, rank)
        self.v_proj = LowRankLinear(hidden_size, hidden_size, rank)
        self.o_proj = LowRankLinear(hidden_size, hidden_size, rank)
        self.register_load_state_dict_post_hook(drop_kept)

    def train(self, mode: bool = True) -> LoRRALearner:
        drop_kept(self)  # training changes the weights: nothing kept for inference outlives it
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        drop_kept(self)  # `.to()`, `.half()`, `.cuda()`: the kept copies would stay behind on the old dtype/device
        return super()._apply(fn, recurse)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., N, d] -> [..., H, N, hd] (a view)."""
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(-3, -2)

    def project_keys(self, feats: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, fused_lowrank: bool = False) -> LearnerKeys:
        """feats: [B, N, d] learner features at true `positions` [B, N] -> keys/values with RoPE applied.
        Under autocast, `feats` arrive already cast (`state.token_set`)."""
        key, value = plus_low_rank_pair(feats, self.k_proj, self.v_proj, fused_lowrank, self, "kv")
        if fused_lowrank and value.requires_grad:
            # The fused pair is one [2, B, N, d] tensor: attention saves `value` for its backward, which as a view
            # would keep the key before RoPE alive with it (a full copy of the keys, per layer, until the backward).
            value = value.clone()
        return LearnerKeys(apply_rope(self._heads(key), cos, sin), self._heads(value), positions, valid)

    def queries(self, query: torch.Tensor, query_rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """query = h' + B_q A_q h' [..., B, T, d] -> [..., B, H, T, hd] with RoPE (both learners' queries at once
        when stacked: the learners share head layout and positions)."""
        return apply_rope(self._heads(query), *query_rope)

    def attend(self, query: torch.Tensor, keys: LearnerKeys,
               mask: tuple[torch.Tensor, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """query [B, H, T, hd] (RoPE applied) -> A_o MHA(Q, K, V) [B, T, r], the output before its up-projection
        (`o_proj.up`), 0 where no key is visible."""
        B, _, T, _ = query.shape
        safe_mask, sees_any = mask if isinstance(mask, tuple) else open_empty_rows(mask)
        if safe_mask.dtype == torch.bool:  # an additive mask in the query's dtype spares SDPA the conversion
            safe_mask = additive_mask(safe_mask, query.dtype)
        key, value = as_dtype(keys.key, query.dtype), as_dtype(keys.value, query.dtype)
        if query.device.type == "cpu" and few_queries(query, key):  # a decoding step (few_queries.py)
            attn = few_query_attention(query, key, value, safe_mask)
        else:
            attn = F.scaled_dot_product_attention(query, key, value, attn_mask=safe_mask)  # [B, H, T, hd]
        # Zero the rows that see nothing after the (linear, bias-free) down-projection: it then reads the attention
        # output itself (a view of what SDPA saves anyway), and the zeroing touches r channels, not d.
        return self.o_proj.down(attn.transpose(1, 2).reshape(B, T, -1)) * as_dtype(sees_any, attn.dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        query_positions: torch.Tensor,
        query_rope: tuple[torch.Tensor, torch.Tensor],
        keys: LearnerKeys,
        mask: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden: [B, T, d] queries (h'); returns the learner output [B, T, d] (0 where no key is visible).

        `mask` is either a [B, T, N] bool mask (official compat mode) or the `(safe_mask, sees_any)` pair of
        `learner_mask` (shared by all layers of one forward); None builds the causal-on-true-positions mask.
        """
        hidden = autocast_input(hidden)
        if mask is None:
            mask = keys.valid[:, None, :] & (keys.positions[:, None, :] <= query_positions[:, :, None])  # [B, T, N]
        return self.o_proj.up(self.attend(self.queries(hidden + self.q_proj(hidden), query_rope), keys, mask))

    def anchor(self) -> torch.Tensor:
        """0 * (sum of parameters): keeps every parameter in the graph when the learner is skipped (DDP/FSDP/ZeRO-2).

        DeepSpeed ZeRO-3 parameters (they carry `ds_id`) are left out: outside their module's forward they hold no
        data, so a sum over them gives a 0-element gradient that ZeRO-3 rejects ("0 != N Cannot reduce scatter"),
        and ZeRO-3's flat gradient buffer counts a parameter without a gradient as a zero gradient anyway.
        """
        params = [p for p in self.parameters() if not hasattr(p, "ds_id")]
        zero = next(self.parameters()).new_zeros(())
        return sum((p.sum() for p in params), zero) * 0.0
