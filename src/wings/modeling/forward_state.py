"""What one forward hands to every Wings layer: the tokens that feed each learner and the `WingsState`.

`build_state` (state.py) gathers, per forward, the learner features (image tokens for the visual learner, text
tokens for the textual one) as `TokenSet`s with their true positions and RoPE tables, and packs them with the
positions, segments and validity of the main attention's keys into a `WingsState`, which every wrapped attention
receives through the decoder's `**kwargs`. Nothing here knows how a learner cache is stored: the dynamic one
(state.LearnerCache) and the pre-allocated one (static_state.StaticLearnerCache) both build on this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .grouped import TokenGrouping
from .kernels import WingsKernels
from .learner import LearnerKeys, autocast_input, head_broadcast
from .router import SEG_IMAGE, SEG_PAD, SEG_TEXT_AFTER, SEG_TEXT_BEFORE, segment_values

if TYPE_CHECKING:
    from .state import LearnerCache
    from .static_state import StaticLearnerCache


@dataclass
class TokenSet:
    """A compact gather of some tokens of each sample: features, true positions, RoPE, validity."""

    feats: torch.Tensor  # [B, N, d]
    positions: torch.Tensor  # [B, N]
    valid: torch.Tensor  # [B, N]
    cos: torch.Tensor  # [B, 1, N, hd] (broadcast over heads)
    sin: torch.Tensor  # [B, 1, N, hd]
    index: torch.Tensor | None = None  # [B, N] the column of each token in this forward (padding: any column)


@dataclass
class WingsState:
    query_positions: torch.Tensor  # [B, T] true positions of this forward's tokens
    key_positions: torch.Tensor  # [B, S] all keys of the main attention (cache included)
    key_segments: torch.Tensor  # [B, S] SEG_* ids
    key_valid: torch.Tensor  # [B, S]
    has_image: torch.Tensor  # [B] bool
    visual_tokens: TokenSet | None
    textual_tokens: TokenSet | None
    cache: LearnerCache | StaticLearnerCache | None = None  # (state.py, static_state.py)
    router_impl: str = "sdpa"
    record: dict[int, torch.Tensor] | None = None  # layer -> router weights, when analysis asks
    compat_official: dict | None = None  # official-compat extras (see compat.py)
    kernels: WingsKernels = field(default_factory=WingsKernels)
    new_segments: torch.Tensor | None = None  # [B, T] SEG_* ids of this forward's tokens
    query_valid: torch.Tensor | None = None  # [B, T] bool: this forward's real (non-padding) tokens
    memo: dict = field(default_factory=dict)  # per-forward tensors every layer shares (masks)
    grouping: TokenGrouping | None = None  # the tokens grouped by kind, when the learners attend grouped
    # Known on the host (from build_state's one sync): no padding query in this forward, every sample has an image.
    # They spare each layer a masking op; False is always correct.
    all_queries_valid: bool = False
    all_have_image: bool = False
    any_image: bool = True  # some sample of the batch has an image (this forward's or a cached one); True is safe

    def plain_causal(self) -> bool:
        """Right padding (or none) without earlier tokens: valid tokens form a prefix at positions 0..n-1, so for
        every valid query the plain causal mask hides exactly the padding keys too (they come after it). Only the
        reference router pass asks (a host sync, so not on the default path)."""
        if "plain_causal" not in self.memo:
            positions, valid = self.query_positions, self.query_valid
            T = positions.shape[1]
            arange = torch.arange(T, device=positions.device)
            self.memo["plain_causal"] = (
                self.key_positions.shape[1] == T
                and bool((valid == (arange[None] < valid.sum(1, keepdim=True))).all())
                and bool((positions == arange[None])[valid].all())
            )
        return self.memo["plain_causal"]

    def learner_keys(self, layer_idx: int, kind: str, learner) -> LearnerKeys | None:
        """This layer's keys for `kind`: cached ones plus the projection of this forward's new tokens."""
        if self.cache is not None and self.cache.preallocated:  # static (pre-allocated)
            return self.cache.learner_keys(self, layer_idx, kind, learner)
        tokens = self.visual_tokens if kind == "visual" else self.textual_tokens
        new = None
        if tokens is not None and tokens.feats.shape[1] > 0:
            new = learner.project_keys(tokens.feats, tokens.positions, tokens.valid, tokens.cos, tokens.sin,
                                       fused_lowrank=self.kernels.fused_lowrank)
        if self.cache is None:
            return new
        return self.cache.learner_keys(layer_idx, kind, new, self.memo)

    def router_values(self, layer_idx: int, router) -> torch.Tensor:
        """[B, S, C] the router's per-key values for every key of the main attention (cache included)."""
        dtype = router.linear.weight.dtype
        shared = router.router_type == "segment"  # indicators: the same in every layer
        if self.cache is None:
            if shared:
                if "segment_values" not in self.memo:
                    self.memo["segment_values"] = segment_values(self.key_segments, dtype)
                return self.memo["segment_values"]
            return router.value_matrix(self.key_positions, self.key_segments, dtype)
        # With a cache only this forward's tokens get new values (the position router's are weight columns: a
        # cache is an inference object, so the weights do not change while it lives).
        name = "segment" if shared else str(layer_idx)
        rows = lambda: router.value_matrix(self.query_positions, self.new_segments, dtype)  # noqa: E731
        if self.cache.preallocated:  # static (pre-allocated)
            return self.cache.router_values(self, name, rows)
        return self.cache.router_values(name, rows)


def gather_tokens(x: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor,
                  n: int | None = None) -> tuple[torch.Tensor, ...]:
    """Compact the tokens where `keep` [B, S] is True, in order. Returns feats [B,N,d], positions, valid and the
    index [B, N] of each. `n`: the largest count of kept tokens in a row, when the caller already knows it."""
    counts = keep.sum(dim=1)
    if n is None:
        n = int(counts.max()) if keep.numel() else 0
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n]  # kept indices first
    feats = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    valid = torch.arange(n, device=x.device)[None, :] < counts[:, None]
    return feats, positions.gather(1, order), valid, order


def token_set(x: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor, rotary_emb,
              n: int | None = None, rope_ids: torch.Tensor | None = None) -> TokenSet:
    """The learner key features where `keep` is True, with RoPE tables at their true positions. Under autocast
    the features are cast here, once per forward, rather than in every layer's key projection.

    `rope_ids`: the rotary ids of this forward's tokens when they are not the 1D `positions`, e.g. M-RoPE's
    `[3, B, T]` (temporal, height, width) of Qwen-VL models, where an image's tokens share a temporal id and the
    text after it continues from the image's extent. Masks and caches keep using `positions` (the token order);
    each key's rotation uses its own token's ids, exactly as the main attention rotates that token."""
    if keep.shape[1] == 1:  # one token per sample (decoding): nothing to compact, `keep` is the validity
        feats, pos, ok, index = x, positions, keep, torch.zeros_like(positions)
        rope = rope_ids
    else:
        feats, pos, ok, index = gather_tokens(x, keep, positions, n)
        rope = None if rope_ids is None else rope_ids.gather(-1, index.expand(*rope_ids.shape[:-2], -1, -1))
    cos, sin = head_broadcast(*rotary_emb(feats, pos if rope is None else rope))
    return TokenSet(autocast_input(feats), pos, ok, cos, sin, index)


def token_segments(is_image: torch.Tensor, valid: torch.Tensor, seen_image: torch.Tensor | None) -> torch.Tensor:
    """SEG_* id of each token: padding, image, text before any image, text after an image."""
    before = is_image.cumsum(dim=1) == 0
    if seen_image is not None:
        before = before & ~seen_image[:, None]
    seg = torch.where(before, SEG_TEXT_BEFORE, SEG_TEXT_AFTER)
    seg = torch.where(is_image, SEG_IMAGE, seg)
    return torch.where(valid, seg, SEG_PAD)
