"""The learner cache of a static (pre-allocated) KV cache: fixed shapes, in-place writes, no host syncs.

`generate(..., cache_implementation="static")` pre-allocates the KV cache to `max_cache_len` columns so that a
compiled decoding step sees the same shapes every time. The learner cache follows suit with one layout, aligned
with the KV cache: column j of every learner buffer belongs to the token in KV column j.

- metadata [B, L]: true position, segment, validity of each column; the router's per-key values [B, L, C];
- learner keys/values [B, H, L, hd] per (layer, kind): every token of a forward is projected for both learners
  and written at its column; a column counts as a visual key if it holds a valid image token and as a textual
  key if it holds a valid text token. Unwritten columns are invalid.

The price of fixed shapes: both learners attend over all L columns (masked) instead of a compact set of their
own tokens, and both project every token. The dynamic cache (state.LearnerCache) stays the fast default;
this one is for compiled decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Cache, StaticCache

from .forward_state import TokenSet, WingsState, token_segments
from .kernels import WingsKernels
from .learner import LearnerKeys, LoRRALearner, autocast_input, head_broadcast
from .router import SEG_IMAGE, SEG_TEXT_AFTER, SEG_TEXT_BEFORE, check_router_width

KIND_SEGMENTS = {"visual": (SEG_IMAGE,), "textual": (SEG_TEXT_BEFORE, SEG_TEXT_AFTER)}


def is_static_cache(cache_obj: Cache) -> bool:
    return isinstance(cache_obj, StaticCache)


class StaticLearnerCache:
    """Pre-allocated learner cache aligned with a `StaticCache`'s columns (see the module docstring)."""

    preallocated = True

    def __init__(self, cache_obj: StaticCache):
        layers = getattr(cache_obj, "layers", [])
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            raise ValueError("the Wings static learner cache needs full-attention layers (a sliding-window layer "
                             "keeps fewer columns than the learners); use the dynamic cache for this model")
        self.max_len = layers[0].max_cache_len
        self.allocated = False
        self.keys: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.values: dict[str, torch.Tensor] = {}  # router values per layer ("segment": shared)

    def allocate(self, batch: int, device: torch.device) -> None:
        """Metadata buffers at the first forward (batch size and device known), with static addresses."""
        L = self.max_len
        self.positions = torch.zeros(batch, L, dtype=torch.long, device=device)
        self.segments = torch.zeros(batch, L, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, L, dtype=torch.bool, device=device)
        self.seen_image = torch.zeros(batch, dtype=torch.bool, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        for t in (self.positions, self.segments, self.valid, self.seen_image, self.length):
            _static(t)
        self.allocated = True

    def build_state(self, inputs_embeds: torch.Tensor, is_image: torch.Tensor, valid: torch.Tensor,
                    position_ids: torch.Tensor, rotary_emb, router_impl: str, kernels: WingsKernels,
                    router_width: int | None, rope_ids: torch.Tensor | None = None) -> WingsState:
        B, T = is_image.shape
        if not self.allocated:
            self.allocate(B, inputs_embeds.device)
        if router_width is not None and self.max_len > router_width:  # positions < max_len are always inside
            check_router_width(router_width, position_ids)
        columns = self.length + torch.arange(T, device=self.length.device)  # [T]
        segments = token_segments(is_image, valid, self.seen_image)
        self.positions.index_copy_(1, columns, position_ids)
        self.segments.index_copy_(1, columns, segments)
        self.valid.index_copy_(1, columns, valid)
        self.seen_image.logical_or_(is_image.any(dim=1))
        self.length.add_(T)
        cos, sin = head_broadcast(*rotary_emb(inputs_embeds, position_ids if rope_ids is None else rope_ids))
        feats = autocast_input(inputs_embeds)
        tokens = {kind: TokenSet(feats, position_ids, valid & _in_segments(segments, kind), cos, sin)
                  for kind in KIND_SEGMENTS}
        state = WingsState(query_positions=position_ids, key_positions=self.positions, key_segments=self.segments,
                           key_valid=self.valid, has_image=self.seen_image.clone(), visual_tokens=tokens["visual"],
                           textual_tokens=tokens["textual"], cache=self, router_impl=router_impl, kernels=kernels,
                           new_segments=segments, query_valid=valid)
        state.memo["columns"] = columns
        return state

    def learner_keys(self, state: WingsState, layer_idx: int, kind: str, learner: LoRRALearner) -> LearnerKeys:
        """Project this forward's tokens, write them at their columns, return every column (masked by kind)."""
        tokens = state.visual_tokens if kind == "visual" else state.textual_tokens
        new = learner.project_keys(tokens.feats, tokens.positions, tokens.valid, tokens.cos, tokens.sin,
                                   fused_lowrank=state.kernels.fused_lowrank)
        if (layer_idx, kind) not in self.keys:
            shape = (*new.key.shape[:2], self.max_len, new.key.shape[-1])
            self.keys[(layer_idx, kind)] = tuple(_static(new.key.new_zeros(shape)) for _ in range(2))
        key, value = self.keys[(layer_idx, kind)]
        key.index_copy_(2, state.memo["columns"], new.key)
        value.index_copy_(2, state.memo["columns"], new.value)
        memo = f"valid/{kind}"
        if memo not in state.memo:
            state.memo[memo] = self.valid & _in_segments(self.segments, kind)
        return LearnerKeys(key, value, self.positions, state.memo[memo])

    def router_values(self, state: WingsState, name: str, new_values: Callable[[], torch.Tensor]) -> torch.Tensor:
        """[B, L, C]: this forward's rows written at their columns (once per forward for a shared entry)."""
        rows = new_values()  # [B, T, C]
        if name not in self.values:
            self.values[name] = _static(rows.new_zeros(rows.shape[0], self.max_len, rows.shape[-1]))
        if f"values/{name}" not in state.memo:
            self.values[name].index_copy_(1, state.memo["columns"], rows)
            state.memo[f"values/{name}"] = True
        return self.values[name]

    def reset(self) -> None:
        """Forget every column, in place (the addresses a compiled step captured stay valid): `StaticCache.reset()`
        between generations."""
        if not self.allocated:
            return
        for t in (self.positions, self.segments, self.valid, self.seen_image, self.length, *self.values.values(),
                  *(t for pair in self.keys.values() for t in pair)):
            t.zero_()

    def select_batch(self, index: torch.Tensor) -> None:
        """Reorder samples in place (beam search keeps the batch size; the addresses stay static)."""
        if not self.allocated:
            return
        if index.shape[0] != self.positions.shape[0]:
            raise ValueError("a static learner cache cannot change its batch size; use the dynamic cache")
        for t in (self.positions, self.segments, self.valid, self.seen_image, *self.values.values(),
                  *(t for pair in self.keys.values() for t in pair)):
            t.copy_(t.index_select(0, index))

    def truncate(self, length: int) -> None:
        """Forget the columns from `length` on (assisted decoding's crop)."""
        if self.allocated:
            self.valid[:, length:] = False
            self.length.fill_(min(int(self.length), length))
            self.seen_image.copy_(((self.segments == SEG_IMAGE) & self.valid).any(dim=1))


def _in_segments(segments: torch.Tensor, kind: str) -> torch.Tensor:
    wanted = KIND_SEGMENTS[kind]
    out = segments == wanted[0]
    for seg in wanted[1:]:
        out = out | (segments == seg)
    return out


def _static(t: torch.Tensor) -> torch.Tensor:
    """Tag a buffer that is only ever written in place, so compiled graphs (and CUDA graphs) may keep its address."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
    return t
