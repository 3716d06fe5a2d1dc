"""Per-forward Wings state: which tokens feed each learner, their true positions, and the learner cache.

The model builds one `WingsState` per forward and passes it down to every wrapped attention through the
decoder's `**kwargs`. With a KV cache, the learners' projected keys and the per-key metadata the router needs
(positions, segments, validity, the router's per-key values) live in a `LearnerCache` attached to the HF cache
object, so each decoding step only projects its new tokens and appends them in place (no re-concatenation).
A static (pre-allocated) cache gets a `StaticLearnerCache` instead (static_state.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .buffers import ColumnBuffer, TransposedColumnBuffer
from .grouped import TokenGrouping, token_grouping, visible_prefixes
from .kernels import WingsKernels
from .learner import LearnerKeys, autocast_input, head_broadcast
from .router import SEG_IMAGE, SEG_PAD, SEG_TEXT_AFTER, SEG_TEXT_BEFORE, check_router_width, segment_values

if TYPE_CHECKING:
    from transformers import Cache

    from .static_state import StaticLearnerCache

METADATA = ("key_positions", "key_segments", "key_valid")


@dataclass
class TokenSet:
    """A compact gather of some tokens of each sample: features, true positions, RoPE, validity."""

    feats: torch.Tensor  # [B, N, d]
    positions: torch.Tensor  # [B, N]
    valid: torch.Tensor  # [B, N]
    cos: torch.Tensor  # [B, 1, N, hd] (broadcast over heads)
    sin: torch.Tensor  # [B, 1, N, hd]
    index: torch.Tensor | None = None  # [B, N] the column of each token in this forward (padding: any column)


class LearnerCache:
    """Everything the learners and router need from earlier forwards of the same generation.

    `kv[(layer, kind)]`: the learners' projected keys and values; `key_meta[kind]`: their true positions and
    validity (the same for every layer); `key_positions`, `key_segments`, `key_valid` [B, S]: per-key metadata of
    the main attention's keys (one column per KV-cache column); router values [B, S, C] per layer (one shared
    entry, "segment", for segment routers); `seen_image` [B]. Columns grow in place with spare capacity
    (`ColumnBuffer`).
    """

    def __init__(self):
        self.kv: dict[tuple[int, str], tuple[ColumnBuffer, ColumnBuffer]] = {}
        self.key_meta: dict[str, tuple[ColumnBuffer, ColumnBuffer]] = {}
        self.columns: dict[str, ColumnBuffer] = {}  # the metadata, then "values/<layer>" router values
        self.seen_image: torch.Tensor | None = None

    def _keys(self, layer: int, kind: str) -> LearnerKeys:
        (key, value), (positions, valid) = self.kv[(layer, kind)], self.key_meta[kind]
        return LearnerKeys(key.view, value.view, positions.view, valid.view)

    def learner_keys(self, layer: int, kind: str, new: LearnerKeys | None, memo: dict) -> LearnerKeys | None:
        """Append this forward's projected keys (if any) to the layer's cached ones; return them all."""
        if new is not None:
            if f"meta/{kind}" not in memo:  # positions and validity: once per forward, shared by the layers
                memo[f"meta/{kind}"] = True
                if kind in self.key_meta:
                    for buffer, part in zip(self.key_meta[kind], (new.positions, new.valid), strict=True):
                        buffer.append(part)
                else:
                    self.key_meta[kind] = (ColumnBuffer(new.positions, 1), ColumnBuffer(new.valid, 1))
            if (layer, kind) in self.kv:
                for buffer, part in zip(self.kv[(layer, kind)], (new.key, new.value), strict=True):
                    buffer.append(part)
            else:
                # On the CPU the values are stored transposed, the layout a decoding step reads fastest
                # (few_queries.py); this first forward attends to its own keys as they came.
                values = TransposedColumnBuffer(new.value) if new.value.device.type == "cpu" else ColumnBuffer(
                    new.value, 2)
                self.kv[(layer, kind)] = (ColumnBuffer(new.key, 2), values)
                if self.key_meta[kind][0].length == new.positions.shape[1]:
                    return new
        return self._keys(layer, kind) if (layer, kind) in self.kv else None

    def drop_keys_from(self, first_removed: torch.Tensor) -> None:
        """Forget the learner keys at true positions >= first_removed [B] (cropping rejected draft tokens)."""
        for kind, (positions, valid) in self.key_meta.items():
            keep = valid.view & (positions.view < first_removed[:, None])
            # Removed tokens are the newest, so their keys sit after every kept key of the row: trim the columns
            # past the last kept key, and mask whatever removed keys remain in rows that keep more.
            column = torch.arange(keep.shape[1], device=keep.device)
            n = int(torch.where(keep, column, -1).max()) + 1 if keep.numel() else 0
            for buffer in (positions, valid, *(b for (_, k), pair in self.kv.items() if k == kind for b in pair)):
                buffer.truncate(n)
            valid.view.copy_(keep[:, :n])

    def _view(self, name: str) -> torch.Tensor | None:
        buffer = self.columns.get(name)
        return None if buffer is None else buffer.view

    key_positions = property(lambda self: self._view("key_positions"))
    key_segments = property(lambda self: self._view("key_segments"))
    key_valid = property(lambda self: self._view("key_valid"))

    @property
    def length(self) -> int:
        return self.columns["key_positions"].length if "key_positions" in self.columns else 0

    def append_metadata(self, positions: torch.Tensor, segments: torch.Tensor, valid: torch.Tensor) -> None:
        for name, new in zip(METADATA, (positions, segments, valid), strict=True):
            self._append(name, new)

    def _append(self, name: str, new: torch.Tensor) -> torch.Tensor:
        if name in self.columns:
            self.columns[name].append(new)
        else:
            self.columns[name] = ColumnBuffer(new, 1)
        return self.columns[name].view

    def router_values(self, name: str, new_values: Callable[[], torch.Tensor]) -> torch.Tensor:
        """[B, S, C] per-key router values: the cached columns plus `new_values()` for this forward's tokens."""
        buffer = self.columns.get(f"values/{name}")
        if buffer is not None and buffer.length == self.length:  # already appended in this forward
            return buffer.view
        return self._append(f"values/{name}", new_values())

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder samples (beam search, batch shrinking)."""
        for pair in (*self.kv.values(), *self.key_meta.values()):
            for buffer in pair:
                buffer.select_batch(index)
        for buffer in self.columns.values():
            buffer.select_batch(index)
        if self.seen_image is not None:
            self.seen_image = self.seen_image[index]

    def truncate(self, length: int) -> None:
        """Forget the metadata and router values of KV columns >= length (the learner keys: generation/cache.py)."""
        for buffer in self.columns.values():
            buffer.truncate(length)
        self.seen_image = ((self.key_segments == SEG_IMAGE) & self.key_valid).any(dim=1)


@dataclass
class WingsState:
    query_positions: torch.Tensor  # [B, T] true positions of this forward's tokens
    key_positions: torch.Tensor  # [B, S] all keys of the main attention (cache included)
    key_segments: torch.Tensor  # [B, S] SEG_* ids
    key_valid: torch.Tensor  # [B, S]
    has_image: torch.Tensor  # [B] bool
    visual_tokens: TokenSet | None
    textual_tokens: TokenSet | None
    cache: LearnerCache | StaticLearnerCache | None = None
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
        if self.cache is not None and not isinstance(self.cache, LearnerCache):  # static (pre-allocated)
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
        if not isinstance(self.cache, LearnerCache):  # static (pre-allocated)
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
              n: int | None = None) -> TokenSet:
    """The learner key features where `keep` is True, with RoPE tables at their true positions. Under autocast
    the features are cast here, once per forward, rather than in every layer's key projection."""
    if keep.shape[1] == 1:  # one token per sample (decoding): nothing to compact, `keep` is the validity
        feats, pos, ok, index = x, positions, keep, torch.zeros_like(positions)
    else:
        feats, pos, ok, index = gather_tokens(x, keep, positions, n)
    cos, sin = head_broadcast(*rotary_emb(feats, pos))
    return TokenSet(autocast_input(feats), pos, ok, cos, sin, index)


def token_segments(is_image: torch.Tensor, valid: torch.Tensor, seen_image: torch.Tensor | None) -> torch.Tensor:
    """SEG_* id of each token: padding, image, text before any image, text after an image."""
    before = is_image.cumsum(dim=1) == 0
    if seen_image is not None:
        before = before & ~seen_image[:, None]
    seg = torch.where(before, SEG_TEXT_BEFORE, SEG_TEXT_AFTER)
    seg = torch.where(is_image, SEG_IMAGE, seg)
    return torch.where(valid, seg, SEG_PAD)


def learner_cache_of(cache_obj: Cache) -> LearnerCache | StaticLearnerCache:
    """The learner cache riding on an HF cache object: created (dynamic or static) at the first forward."""
    from .static_state import StaticLearnerCache, is_static_cache

    cache = getattr(cache_obj, "wings_cache", None)
    fresh = cache is None or (not isinstance(cache, StaticLearnerCache) and cache_obj.get_seq_length() == 0)
    if fresh:
        cache = StaticLearnerCache(cache_obj) if is_static_cache(cache_obj) else LearnerCache()
        cache_obj.wings_cache = cache
    return cache


def build_state(
    inputs_embeds: torch.Tensor,
    is_image: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    rotary_emb,
    cache_obj: Cache | None = None,
    router_impl: str = "sdpa",
    kernels: WingsKernels | None = None,
    router_width: int | None = None,
) -> WingsState:
    """Gather learner features from the spliced layer-0 embeddings and set up positions, segments and cache.
    `router_width`: the position router's column count (positions beyond it are refused), None otherwise."""
    kernels = kernels or WingsKernels()
    valid = attention_mask[:, -is_image.shape[1]:].bool()  # this forward's tokens
    cache = learner_cache_of(cache_obj) if cache_obj is not None else None
    if cache is not None and not isinstance(cache, LearnerCache):  # pre-allocated: no gathers, no growth
        return cache.build_state(inputs_embeds, is_image, valid, position_ids, rotary_emb, router_impl, kernels,
                                 router_width)
    if router_width is not None:  # earlier tokens were checked by earlier forwards
        check_router_width(router_width, position_ids)
    seen = cache.seen_image if cache is not None else None
    segments = token_segments(is_image, valid, seen)

    visual_keep, textual_keep = is_image & valid, ~is_image & valid
    # Grouped learner attention (grouped.py) needs every key to be one of this forward's tokens.
    grouped = kernels.grouped_learners and is_image.shape[1] > 1 and (cache is None or cache.length == 0)
    has_image = is_image.any(dim=1) if seen is None else is_image.any(dim=1) | seen
    counts = [visual_keep.sum(1).max(), textual_keep.sum(1).max(), valid.all(), has_image.all()]
    # One host sync for the counts and flags (a compiled forward breaks its graph here, before the decoder).
    n_visual, n_textual, all_valid, all_images, *visible = torch.stack(
        counts + (visible_prefixes(visual_keep, textual_keep) if grouped else [])).tolist()
    visual = token_set(inputs_embeds, visual_keep, position_ids, rotary_emb, n_visual) if n_visual else None
    textual = token_set(inputs_embeds, textual_keep, position_ids, rotary_emb, n_textual) if n_textual else None
    grouping = None
    if grouped and (visual is not None or textual is not None):
        grouping = token_grouping(visual, textual, valid, dict(zip(("visual", "textual"), visible, strict=True)))
    key_positions, key_segments, key_valid = position_ids, segments, valid
    if cache is not None:
        cache.append_metadata(position_ids, segments, valid)
        key_positions, key_segments, key_valid = cache.key_positions, cache.key_segments, cache.key_valid
        cache.seen_image = has_image
    return WingsState(
        query_positions=position_ids,
        key_positions=key_positions,
        key_segments=key_segments,
        key_valid=key_valid,
        has_image=has_image,
        visual_tokens=visual,
        textual_tokens=textual,
        cache=cache,
        router_impl=router_impl,
        kernels=kernels,
        new_segments=segments,
        query_valid=valid,
        grouping=grouping,
        all_queries_valid=bool(all_valid),
        all_have_image=bool(all_images),
    )
