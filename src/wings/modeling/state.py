"""Per-forward Wings state: which tokens feed each learner, their true positions, and the learner cache.

The model builds one `WingsState` per forward and passes it down to every wrapped attention through the
decoder's `**kwargs`. With a KV cache, the learners' projected keys and the per-key metadata the router needs
(positions, segments, validity) live in a `LearnerCache` attached to the HF cache object, so each decoding
step only projects its new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .learner import LearnerKeys, autocast_input
from .router import SEG_IMAGE, SEG_PAD, SEG_TEXT_AFTER, SEG_TEXT_BEFORE


@dataclass
class TokenSet:
    """A compact gather of some tokens of each sample: features, true positions, RoPE, validity."""

    feats: torch.Tensor  # [B, N, d]
    positions: torch.Tensor  # [B, N]
    valid: torch.Tensor  # [B, N]
    cos: torch.Tensor  # [B, N, hd]
    sin: torch.Tensor  # [B, N, hd]


@dataclass
class LearnerCache:
    """Everything the learners and router need from earlier forwards of the same generation."""

    keys: dict[tuple[int, str], LearnerKeys] = field(default_factory=dict)
    key_positions: torch.Tensor | None = None  # [B, S]
    key_segments: torch.Tensor | None = None  # [B, S]
    key_valid: torch.Tensor | None = None  # [B, S]
    seen_image: torch.Tensor | None = None  # [B] bool: an image token appeared so far

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder samples (beam search, batch shrinking)."""
        self.keys = {k: v.select_batch(index) for k, v in self.keys.items()}
        for name in ("key_positions", "key_segments", "key_valid", "seen_image"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])


@dataclass
class WingsState:
    query_positions: torch.Tensor  # [B, T] true positions of this forward's tokens
    key_positions: torch.Tensor  # [B, S] all keys of the main attention (cache included)
    key_segments: torch.Tensor  # [B, S] SEG_* ids
    key_valid: torch.Tensor  # [B, S]
    has_image: torch.Tensor  # [B] bool
    visual_tokens: TokenSet | None
    textual_tokens: TokenSet | None
    cache: LearnerCache | None = None
    router_impl: str = "sdpa"
    plain_causal: bool = False  # every key valid at position == index, no cache: a plain causal mask suffices
    record: dict[int, torch.Tensor] | None = None  # layer -> router weights, when analysis asks
    compat_official: dict | None = None  # official-compat extras (see compat.py)
    memo: dict = field(default_factory=dict)  # per-forward tensors every layer shares (masks)

    def learner_keys(self, layer_idx: int, kind: str, learner) -> LearnerKeys | None:
        """This layer's keys for `kind`: cached ones plus the projection of this forward's new tokens."""
        tokens = self.visual_tokens if kind == "visual" else self.textual_tokens
        new = None
        if tokens is not None and tokens.feats.shape[1] > 0:
            new = learner.project_keys(tokens.feats, tokens.positions, tokens.valid, tokens.cos, tokens.sin)
        if self.cache is None:
            return new
        old = self.cache.keys.get((layer_idx, kind))
        keys = new if old is None else (old if new is None else old.extend(new))
        if keys is not None:
            self.cache.keys[(layer_idx, kind)] = keys
        return keys


def gather_tokens(x: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Compact the tokens where `keep` [B, S] is True, in order. Returns feats [B,N,d], positions, valid."""
    counts = keep.sum(dim=1)
    n = int(counts.max()) if keep.numel() else 0
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n]  # kept indices first
    feats = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    valid = torch.arange(n, device=x.device)[None, :] < counts[:, None]
    return feats, positions.gather(1, order), valid


def token_set(x: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor, rotary_emb) -> TokenSet:
    """The learner key features where `keep` is True, with RoPE tables at their true positions. Under autocast
    the features are cast here, once per forward, rather than in every layer's key projection."""
    feats, pos, ok = gather_tokens(x, keep, positions)
    cos, sin = rotary_emb(feats, pos)
    return TokenSet(autocast_input(feats), pos, ok, cos, sin)


def token_segments(is_image: torch.Tensor, valid: torch.Tensor, seen_image: torch.Tensor | None) -> torch.Tensor:
    """SEG_* id of each token: padding, image, text before any image, text after an image."""
    before = is_image.cumsum(dim=1) == 0
    if seen_image is not None:
        before = before & ~seen_image[:, None]
    seg = torch.where(before, SEG_TEXT_BEFORE, SEG_TEXT_AFTER)
    seg = torch.where(is_image, SEG_IMAGE, seg)
    return torch.where(valid, seg, SEG_PAD)


def build_state(
    inputs_embeds: torch.Tensor,
    is_image: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    rotary_emb,
    cache_obj=None,
    router_impl: str = "sdpa",
) -> WingsState:
    """Gather learner features from the spliced layer-0 embeddings and set up positions, segments and cache."""
    valid = attention_mask[:, -is_image.shape[1]:].bool()  # this forward's tokens
    cache = None
    if cache_obj is not None:
        cache = getattr(cache_obj, "wings_cache", None)
        if cache is None or cache_obj.get_seq_length() == 0:
            cache = LearnerCache()
            cache_obj.wings_cache = cache
    seen = cache.seen_image if cache is not None else None
    segments = token_segments(is_image, valid, seen)

    def tokens_where(keep: torch.Tensor) -> TokenSet | None:
        return token_set(inputs_embeds, keep, position_ids, rotary_emb) if keep.any() else None

    visual = tokens_where(is_image & valid)
    textual = tokens_where(~is_image & valid)
    has_image = is_image.any(dim=1)
    key_positions, key_segments, key_valid = position_ids, segments, valid
    if cache is not None:
        if cache.key_positions is not None:
            key_positions = torch.cat([cache.key_positions, position_ids], dim=1)
            key_segments = torch.cat([cache.key_segments, segments], dim=1)
            key_valid = torch.cat([cache.key_valid, valid], dim=1)
            has_image = has_image | cache.seen_image
        cache.key_positions, cache.key_segments, cache.key_valid = key_positions, key_segments, key_valid
        cache.seen_image = has_image
    # Right padding (or none) without a cache: valid tokens form a prefix at positions 0..n-1, so for every
    # valid query the plain causal mask hides exactly the padding keys too (they come after it).
    T = position_ids.shape[1]
    arange = torch.arange(T, device=position_ids.device)
    plain_causal = (
        key_positions.shape[1] == T
        and bool((valid == (arange[None] < valid.sum(1, keepdim=True))).all())
        and bool((position_ids == arange[None])[valid].all())
    )
    return WingsState(
        plain_causal=plain_causal,
        query_positions=position_ids,
        key_positions=key_positions,
        key_segments=key_segments,
        key_valid=key_valid,
        has_image=has_image,
        visual_tokens=visual,
        textual_tokens=textual,
        cache=cache,
        router_impl=router_impl,
    )
