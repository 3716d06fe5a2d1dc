"""`build_state` and the dynamic learner cache: which tokens feed each learner, and what decoding keeps of them.

The model builds one `WingsState` per forward and passes it down to every wrapped attention through the
decoder's `**kwargs`. With a KV cache, the learners' projected keys and the per-key metadata the router needs
(positions, segments, validity, the router's per-key values) live in a `LearnerCache` attached to the HF cache
object, so each decoding step only projects its new tokens and appends them in place (no re-concatenation).
A static (pre-allocated) cache gets a `StaticLearnerCache` instead (static_state.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .buffers import ColumnBuffer, TransposedColumnBuffer
from .forward_state import TokenSet, WingsState, gather_tokens, token_segments, token_set
from .grouped import token_grouping, visible_prefixes
from .kernels import WingsKernels
from .learner import LearnerKeys
from .router import SEG_IMAGE, SEG_PAD, check_router_width
from .static_state import StaticLearnerCache, is_static_cache

if TYPE_CHECKING:
    from transformers import Cache

METADATA = ("key_positions", "key_segments", "key_valid")
__all__ = ["LearnerCache", "TokenSet", "WingsState", "build_state", "gather_tokens", "learner_cache_of",
           "token_segments", "token_set"]


class LearnerCache:
    """Everything the learners and router need from earlier forwards of the same generation.

    `kv[(layer, kind)]`: the learners' projected keys and values; `key_meta[kind]`: their true positions and
    validity (the same for every layer); `key_positions`, `key_segments`, `key_valid` [B, S]: per-key metadata of
    the main attention's keys (one column per KV-cache column); router values [B, S, C] per layer (one shared
    entry, "segment", for segment routers); `seen_image` [B]. Columns grow in place with spare capacity
    (`ColumnBuffer`).
    """

    preallocated = False  # (WingsState dispatches on it; StaticLearnerCache is the pre-allocated kind)

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

    def concat_batch(self, other: LearnerCache, pad: int, other_pad: int) -> None:
        """Append `other`'s rows after this cache's rows (in place; continuous batching).

        The KV cache pads this cache's columns on the left by `pad` and `other`'s by `other_pad` to a common length:
        the metadata and router values are padded alike (invalid keys, segment "padding", zero values). The learner
        keys of each kind are left-padded to the longer of the two with invalid keys (`valid=False`, which the
        learner masks honour); a kind only one side has gets all-invalid columns on the other."""
        fills = {"key_positions": 0, "key_segments": SEG_PAD, "key_valid": False}
        rows = (self.key_positions.shape[0], other.key_positions.shape[0])
        widths = (self.length + pad, other.length + other_pad)  # (equal: the merged KV length)
        for name in self.columns.keys() | other.columns.keys():  # one column per KV column
            self.columns[name] = _joined(self.columns.get(name), other.columns.get(name), rows, 1, widths,
                                         fills.get(name, 0))
        for kind in self.key_meta.keys() | other.key_meta.keys():  # learner keys: columns of their own
            metas = (self.key_meta.get(kind), other.key_meta.get(kind))
            width = max(meta[0].length for meta in metas if meta is not None)
            self.key_meta[kind] = tuple(
                _joined(*(meta and meta[i] for meta in metas), rows, 1, (width, width), 0) for i in range(2))
            for name in sorted({name for name in (*self.kv, *other.kv) if name[1] == kind}):
                pairs = (self.kv.get(name), other.kv.get(name))
                self.kv[name] = tuple(_joined(*(pair and pair[i] for pair in pairs), rows, -2, (width, width), 0)
                                      for i in range(2))
        seen = [c.seen_image if c.seen_image is not None else torch.zeros(n, dtype=torch.bool,
                                                                           device=self.key_positions.device)
                for c, n in zip((self, other), rows, strict=True)]
        self.seen_image = torch.cat(seen)

    def drop_leading(self, n: int) -> None:
        """Forget the first `n` KV columns (padding in every row), and learner key columns that are invalid in every
        row (a kind with no valid key left goes altogether)."""
        if n:
            for name, buffer in self.columns.items():
                self.columns[name] = _rebuilt(buffer, buffer.view[:, n:])
        for kind, (positions, valid) in list(self.key_meta.items()):
            keep = valid.view.any(dim=0)
            if bool(keep.all()):
                continue
            names = [name for name in self.kv if name[1] == kind]
            if not bool(keep.any()):
                del self.key_meta[kind]
                for name in names:
                    del self.kv[name]
                continue
            index = keep.nonzero().squeeze(1)
            self.key_meta[kind] = (_rebuilt(positions, positions.view[:, index]), _rebuilt(valid, valid.view[:, index]))
            for name in names:
                self.kv[name] = tuple(_rebuilt(b, b.view.index_select(-2, index)) for b in self.kv[name])

    def truncate(self, length: int) -> None:
        """Forget the metadata and router values of KV columns >= length (the learner keys: cache.py)."""
        for buffer in self.columns.values():
            buffer.truncate(length)
        self.seen_image = ((self.key_segments == SEG_IMAGE) & self.key_valid).any(dim=1)


def _joined(first: ColumnBuffer | None, second: ColumnBuffer | None, rows: tuple[int, int], dim: int,
            widths: tuple[int, int], fill) -> ColumnBuffer:
    """The rows of `first` then those of `second`, each left-padded with `fill` to its width in `widths` along `dim`
    (of the buffers' views); a side without the buffer (None) is all `fill`."""
    ref = (first or second).view
    parts = []
    for buffer, n, width in zip((first, second), rows, widths, strict=True):
        view = buffer.view if buffer is not None else ref.new_zeros(_with(ref.shape, {0: n, dim: 0}))
        missing = width - view.shape[dim]
        if missing > 0:
            view = torch.cat([view.new_full(_with(view.shape, {dim: missing}), fill), view], dim=dim)
        parts.append(view)
    return _rebuilt(first or second, torch.cat(parts))


def _with(shape: torch.Size, sizes: dict[int, int]) -> list[int]:
    out = list(shape)
    for dim, size in sizes.items():
        out[dim] = size
    return out


def _rebuilt(like: ColumnBuffer, view: torch.Tensor) -> ColumnBuffer:
    """A buffer of `like`'s kind (and growth) holding `view` (a copy)."""
    if isinstance(like, TransposedColumnBuffer):
        return TransposedColumnBuffer(view, like.growth)
    return ColumnBuffer(view, like.dim, like.growth)


def learner_cache_of(cache_obj: Cache) -> LearnerCache | StaticLearnerCache:
    """The learner cache riding on an HF cache object: created (dynamic or static) at the first forward."""
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
    rope_ids: torch.Tensor | None = None,
) -> WingsState:
    """Gather learner features from the spliced layer-0 embeddings and set up positions, segments and cache.
    `position_ids` [B, T]: the tokens' true order (masks, caches, the position router). `rope_ids`: their rotary
    ids when those differ from `position_ids` (M-RoPE: [3, B, T]; see `token_set`), None otherwise.
    `router_width`: the position router's column count (positions beyond it are refused), None otherwise."""
    kernels = kernels or WingsKernels()
    valid = attention_mask[:, -is_image.shape[1]:].bool()  # this forward's tokens
    cache = learner_cache_of(cache_obj) if cache_obj is not None else None
    if cache is not None and cache.preallocated:  # no gathers, no growth
        return cache.build_state(inputs_embeds, is_image, valid, position_ids, rotary_emb, router_impl, kernels,
                                 router_width, rope_ids)
    if router_width is not None:  # earlier tokens were checked by earlier forwards
        check_router_width(router_width, position_ids)
    seen = cache.seen_image if cache is not None else None
    segments = token_segments(is_image, valid, seen)

    visual_keep, textual_keep = is_image & valid, ~is_image & valid
    # Grouped learner attention (grouped.py) needs every key to be one of this forward's tokens.
    grouped = kernels.grouped_learners and is_image.shape[1] > 1 and (cache is None or cache.length == 0)
    has_image = is_image.any(dim=1) if seen is None else is_image.any(dim=1) | seen
    counts = [visual_keep.sum(1).max(), textual_keep.sum(1).max(), valid.all(), has_image.all(), has_image.any()]
    # One host sync for the counts and flags (a compiled forward breaks its graph here, before the decoder).
    n_visual, n_textual, all_valid, all_images, any_image, *visible = torch.stack(
        counts + (visible_prefixes(visual_keep, textual_keep) if grouped else [])).tolist()
    visual, textual = (token_set(inputs_embeds, keep, position_ids, rotary_emb, n, rope_ids) if n else None
                       for keep, n in ((visual_keep, n_visual), (textual_keep, n_textual)))
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
        any_image=bool(any_image),
    )
