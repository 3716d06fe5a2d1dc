"""LoRRA (Low-Rank Residual Attention): the visual and textual learners of Wings.

    Q = x + B_q A_q x        x: the layer's post-attention residual stream h'      [B, T, d]
    K = f + B_k A_k f        f: the learner's features (image or text embeddings)  [B, N, d]
    V = f + B_v A_v f
    O = B_o A_o MHA(Q, K, V)     no identity term on O, so a fresh learner (B = 0) outputs exactly 0

Attention is causal on *true* positions (a query at position p sees keys at positions <= p) and RoPE uses
the LLM's own rotary embedding at those positions. A query that sees no key gets 0, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init


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


@dataclass
class LearnerKeys:
    """Keys/values of one learner in one layer, after projection and RoPE, ready for attention."""

    key: torch.Tensor  # [B, H, N, hd]
    value: torch.Tensor  # [B, H, N, hd]
    positions: torch.Tensor  # [B, N] true sequence positions
    valid: torch.Tensor  # [B, N] bool; False for padding slots

    def extend(self, other: LearnerKeys) -> LearnerKeys:
        """Append `other`'s keys after ours (used by the KV cache when new tokens arrive)."""
        return LearnerKeys(
            key=torch.cat([self.key, other.key], dim=2),
            value=torch.cat([self.value, other.value], dim=2),
            positions=torch.cat([self.positions, other.positions], dim=1),
            valid=torch.cat([self.valid, other.valid], dim=1),
        )

    def select_batch(self, index: torch.Tensor) -> LearnerKeys:
        return LearnerKeys(self.key[index], self.value[index], self.positions[index], self.valid[index])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, hd]; cos/sin: [B, N, hd] from the LLM's rotary embedding at the tokens' true positions."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


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

    SDPA returns NaN for a row with no visible key: such rows are opened here and their output zeroed after.
    """
    sees_any = mask.any(dim=-1, keepdim=True)
    return (mask | ~sees_any)[:, None], sees_any


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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, hd]

    def project_keys(
        self, feats: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> LearnerKeys:
        """feats: [B, N, d] learner features at true `positions` [B, N] -> keys/values with RoPE applied.
        Under autocast, `feats` arrive already cast (`state.token_set`)."""
        key = self._heads(feats + self.k_proj(feats))
        value = self._heads(feats + self.v_proj(feats))
        return LearnerKeys(apply_rope(key, cos, sin), value, positions, valid)

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
        B, T, d = hidden.shape
        hidden = autocast_input(hidden)
        query = apply_rope(self._heads(hidden + self.q_proj(hidden)), *query_rope)  # [B, H, T, hd]
        if mask is None:
            mask = keys.valid[:, None, :] & (keys.positions[:, None, :] <= query_positions[:, :, None])  # [B, T, N]
        safe_mask, sees_any = mask if isinstance(mask, tuple) else open_empty_rows(mask)
        attn = F.scaled_dot_product_attention(query, keys.key.to(query.dtype), keys.value.to(query.dtype),
                                              attn_mask=safe_mask)  # [B, H, T, hd]
        attn = attn.transpose(1, 2).reshape(B, T, d) * sees_any.to(attn.dtype)
        return self.o_proj(attn)

    def anchor(self) -> torch.Tensor:
        """0 * (sum of parameters): keeps every parameter in the graph when the learner is skipped (DDP/FSDP/ZeRO-2).

        DeepSpeed ZeRO-3 parameters (they carry `ds_id`) are left out: outside their module's forward they hold no
        data, so a sum over them gives a 0-element gradient that ZeRO-3 rejects ("0 != N Cannot reduce scatter"),
        and ZeRO-3's flat gradient buffer counts a parameter without a gradient as a zero gradient anyway.
        """
        params = [p for p in self.parameters() if not hasattr(p, "ds_id")]
        zero = next(self.parameters()).new_zeros(())
        return sum((p.sum() for p in params), zero) * 0.0
