"""Keep the learner cache in step with the KV cache through everything `generate` does to it.

The learner keys and the router's per-key metadata live on the HF cache object (`cache.wings_cache`, see
modeling/state.py). Plain greedy/sampling decoding only appends, which `build_state` handles; beam search
reorders the batch, prompt-lookup/assisted decoding crops rejected tokens, and `num_return_sequences`
expands the batch. `WingsDynamicCache` applies each of those operations to the learner cache too, and
`WingsStaticCache` does the same for a pre-allocated (static) cache and its `StaticLearnerCache`
(`generate(..., cache_implementation="static")`, the layout a compiled decoding step needs).

`GrowingDynamicCache` (the base of `WingsDynamicCache`) keeps the main attention's keys and values the way the
learner cache keeps its own: in place with spare capacity, where HF's `DynamicLayer` copies the whole layer cache
with `torch.cat` at every step (at width that copy was ~0.8 ms per layer and step on one CPU core, 2 of 38 ms).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

from .buffers import ColumnBuffer
from .state import LearnerCache
from .static_state import StaticLearnerCache

KV_GROWTH = 1.25  # spare capacity of a growing layer: the KV cache is the largest inference tensor


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values grow in place (`ColumnBuffer`): `keys`/`values` are views of the used
    columns of a larger storage. Whatever the base class does by replacing `keys`/`values` (batch selection,
    offloading, a reset) stays correct: a replaced tensor is taken over as the new storage at the next update."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self._held()
        if held is None and self.keys.numel() == 0:  # the first tokens (the empty tensor of `lazy_initialization`)
            held = self._hold(key_states, value_states)
        else:
            held = held or self._hold(self.keys, self.values)  # keys replaced by the base class: take them over
            held[0].append(key_states)
            held[1].append(value_states)
        self.keys, self.values = held[0].view, held[1].view
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        held = self._held()
        if tokens_to_remove >= 0 or held is None:
            return super().crop(tokens_to_remove)  # its own checks and errors
        for buffer in held:  # the storage is kept: the next tokens overwrite the cropped columns
            buffer.truncate(max(buffer.length + tokens_to_remove, 0))
        self.keys, self.values = held[0].view, held[1].view

    def _held(self) -> tuple[ColumnBuffer, ColumnBuffer] | None:
        """The buffers behind `keys`/`values`, unless something replaced those since."""
        held = self.__dict__.get("_wings_buffers")
        if held is None or self.keys is not held[0].view or self.values is not held[1].view:
            return None
        return held

    def _hold(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[ColumnBuffer, ColumnBuffer]:
        held = self.__dict__["_wings_buffers"] = (ColumnBuffer(keys, 2, KV_GROWTH), ColumnBuffer(values, 2, KV_GROWTH))
        return held


def grow_in_place(cache: DynamicCache) -> None:
    """Make the full-attention layers of `cache` (and those it creates later) `GrowingLayer`s (class swap; sliding
    window layers keep HF's own update, which trims them)."""
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer


class GrowingDynamicCache(DynamicCache):
    """HF's `DynamicCache` with `GrowingLayer`s: the same cache without a copy of itself at every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        grow_in_place(self)


class WingsDynamicCache(GrowingDynamicCache):
    """A `DynamicCache` whose batch and length operations also apply to the attached `wings_cache`.

    It adds behaviour only, no state of its own (the learner cache is attached lazily by `build_state`),
    so a plain `DynamicCache` can be upgraded in place (`upgrade_cache`).
    """

    @property
    def _learner(self) -> LearnerCache | None:
        return getattr(self, "wings_cache", None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self._learner is not None:
            self._learner.select_batch(beam_idx.to(_device_of(self._learner, beam_idx)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self._learner is not None:
            self._learner.select_batch(indices.to(_device_of(self._learner, indices)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        learner = self._learner
        if learner is not None and learner.key_positions is not None:
            batch = learner.key_positions.shape[0]
            learner.select_batch(torch.arange(batch, device=learner.key_positions.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        learner = self._learner
        if learner is not None and learner.key_positions is not None:
            crop_learner_cache(learner, self.get_seq_length())

    def reset(self) -> None:
        super().reset()
        self.__dict__.pop("wings_cache", None)  # the next forward starts a new learner cache

    # --- continuous batching: rows join and leave a running batch (TGI's pattern on plain HF caches) -----------

    def concat_batch(self, other: WingsDynamicCache, mask: torch.Tensor, other_mask: torch.Tensor) -> torch.Tensor:
        """Append `other`'s rows after this cache's rows, in place; return the merged 2D attention mask.

        `mask` [B1, S1] and `other_mask` [B2, S2] are the two batches' attention masks (1 = a real token; they
        cover exactly the cached columns). The shorter cache is left-padded to the longer one's length: its KV
        gets zero columns, which the merged mask marks as padding, and its learner cache gets invalid keys (see
        `LearnerCache.concat_batch`). Both caches must come from the same model; `other` is left unusable."""
        length, other_length = self.get_seq_length(), other.get_seq_length()
        if mask.shape[1] != length or other_mask.shape[1] != other_length:
            raise ValueError(f"the masks cover {mask.shape[1]} and {other_mask.shape[1]} columns but the caches hold "
                             f"{length} and {other_length}")
        if len(self.layers) != len(other.layers):
            raise ValueError(f"cannot merge caches of {len(self.layers)} and {len(other.layers)} layers")
        width = max(length, other_length)
        pad, other_pad = width - length, width - other_length
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            for layer in (mine, theirs):
                if getattr(layer, "is_sliding", False) or not isinstance(layer, DynamicLayer):
                    raise ValueError(f"a running batch merges full-attention dynamic layers only, not "
                                     f"{type(layer).__name__}")
            keys = torch.cat([_left_padded(mine.keys, pad), _left_padded(theirs.keys, other_pad)])
            values = torch.cat([_left_padded(mine.values, pad), _left_padded(theirs.values, other_pad)])
            _replace(mine, keys, values)
        learner, other_learner = self._learner, other._learner
        if (learner is None) != (other_learner is None):
            raise ValueError("cannot merge a cache with a learner cache and one without")
        if learner is not None:
            learner.concat_batch(other_learner, pad, other_pad)
        return torch.cat([_left_padded(mask, pad), _left_padded(other_mask, other_pad)])

    def filter_batch(self, indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Keep the rows `indices` (in that order) and drop the leading columns that are padding in every kept row;
        return the kept rows' attention mask, trimmed alike. Learner key columns invalid in every kept row go too."""
        indices = indices.to(mask.device)
        mask = mask[indices]
        if indices.numel() != self.layers[0].keys.shape[0] or bool((indices != torch.arange(
                indices.numel(), device=indices.device)).any()):
            self.batch_select_indices(indices)
        real = mask.bool().any(dim=0)
        n = int(real.long().argmax()) if bool(real.any()) else mask.shape[1]
        for layer in self.layers:
            if n and layer.is_initialized and layer.keys.numel():
                _replace(layer, layer.keys[:, :, n:], layer.values[:, :, n:])
        if self._learner is not None:
            self._learner.drop_leading(n)
        return mask[:, n:]


class WingsStaticCache(StaticCache):
    """A `StaticCache` whose batch and length operations also apply to its (pre-allocated) learner cache."""

    @property
    def _learner(self) -> StaticLearnerCache | None:
        return getattr(self, "wings_cache", None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self._learner is not None:
            self._learner.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self._learner is not None:
            self._learner.select_batch(indices)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self._learner is not None:
            self._learner.truncate(int(self.get_seq_length()))

    def reset(self) -> None:
        """HF's way to reuse a static cache (and a step compiled against its addresses): clear the learner cache
        too, in place."""
        super().reset()
        if self._learner is not None:
            self._learner.reset()


def _left_padded(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` [B, ..., S, D] (KV) or [B, S] (a mask) with `n` zero columns before its own."""
    if n == 0:
        return x
    dim = 1 if x.dim() == 2 else -2
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _replace(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """New keys/values for a layer: a `GrowingLayer` takes them over as its storage at its next update."""
    layer.keys, layer.values = keys, values
    layer.__dict__.pop("_wings_buffers", None)


def _device_of(learner: LearnerCache, fallback: torch.Tensor) -> torch.device:
    return learner.key_positions.device if learner.key_positions is not None else fallback.device


def crop_learner_cache(learner: LearnerCache, new_length: int) -> None:
    """Forget the tokens at buffer columns >= new_length: their metadata and the learner keys they produced."""
    positions, valid = learner.key_positions, learner.key_valid
    if new_length >= positions.shape[1]:
        return
    removed = positions[:, new_length:].masked_fill(~valid[:, new_length:], torch.iinfo(positions.dtype).max)
    first_removed = removed.min(dim=1).values  # [B]: every key at or after this true position goes
    learner.truncate(new_length)
    learner.drop_keys_from(first_removed)


def upgrade_cache(cache) -> None:
    """Give a plain `DynamicCache` / `StaticCache` the learner-aware batch/length operations (class swap, no data
    copied)."""
    if type(cache) is DynamicCache:
        cache.__class__ = WingsDynamicCache
        grow_in_place(cache)
    elif type(cache) is StaticCache:
        cache.__class__ = WingsStaticCache


def prepare_generation_cache(model, base_prepare, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
    """`_prepare_cache_for_generation` for Wings models: learner-aware caches, and none in official compat mode."""
    has_images = model_kwargs.get("pixel_values") is not None
    keep_placeholders_out(generation_config, [model.config.image_token_id], has_images)
    if model.config.compat == "official":
        if model_kwargs.get("cache") is not None:
            raise ValueError(
                "compat='official' cannot decode with a KV cache (the released textual learner lets earlier tokens "
                "attend to later ones, so every step recomputes the whole sequence); drop the `cache` argument"
            )
        generation_config.use_cache = False
        return
    base_prepare(generation_config, model_kwargs, *args, **kwargs)
    learner_aware_cache(generation_config, model_kwargs)


def keep_placeholders_out(generation_config, placeholder_ids: list[int], has_images: bool) -> None:
    """Never generate an image placeholder: it has no image to fill it and would break the next step
    (`generation_config` is a per-call copy, the model's own is untouched)."""
    generation_config.suppress_tokens = sorted({*(generation_config.suppress_tokens or []), *placeholder_ids})
    if generation_config.prompt_lookup_num_tokens and has_images:
        raise ValueError(
            "prompt-lookup decoding copies prompt tokens as draft tokens, image placeholders included, which have "
            "no image to fill them; use it with text-only prompts"
        )


def learner_aware_cache(generation_config, model_kwargs: dict) -> None:
    """Upgrade the cache `generate` prepared so beams, batch selection and crops reach the learner cache too."""
    cache = model_kwargs.get("cache")
    if cache is None:
        return
    upgrade_cache(cache)
    if not isinstance(cache, WingsDynamicCache | WingsStaticCache) and generation_config.num_beams > 1:
        raise ValueError(
            f"beam search with a {type(cache).__name__} cannot keep the Wings learner cache in step; "
            "use the default dynamic cache or use_cache=False"
        )


def expand_pixel_values(input_ids: torch.Tensor, pixel_values: torch.Tensor, expand_size: int,
                        image_token_id: int, image_seq_length: int) -> torch.Tensor:
    """pixel_values are per image, not per sample: repeat each sample's images as a block, `expand_size` times."""
    counts = ((input_ids == image_token_id).sum(dim=1) // image_seq_length).tolist()
    if sum(counts) != pixel_values.shape[0]:
        raise ValueError(
            f"the prompts hold {sum(counts)} images' worth of image tokens but {pixel_values.shape[0]} images "
            "were given"
        )
    starts = [sum(counts[:i]) for i in range(len(counts))]
    order = [s + j for s, n in zip(starts, counts, strict=True) for _ in range(expand_size) for j in range(n)]
    return pixel_values[torch.tensor(order, dtype=torch.long, device=pixel_values.device)]
