"""The model side of continuous batching: prefill a group of prompts into a learner-aware cache, merge it into the
batch that is decoding, drop rows, and run one decode step for every row (TGI's pattern on plain HF caches).

Both kinds of served model go through the same calls (`model(input_ids, attention_mask, position_ids, cache,
...)`) with explicit position ids, so rows that were prefilled at different times decode side by side:

- 1D RoPE (composed Wings/LLaVA models, Llava-family VLMs): a token's position is the count of real tokens before
  it in its own row (left padding and merge padding do not shift it);
- M-RoPE (Qwen-VL families): the prefill gets `[4, B, T]` ids as `generate` builds them (row 0 the text order,
  rows 1-3 the model's `get_rope_index`), and each row keeps its own `rope_delta`; a decode step passes
  `[4, B, 1]` = (text position, text position + delta x 3). `generate` keeps one delta per batch on the model
  (`model.model.rope_deltas`), which rows from different prefills cannot share.

Padding columns (a prompt's left padding, and the columns a merge adds) are zero in the KV cache, 0 in the
attention mask and invalid keys in the learner cache, so a row decodes as it would alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..modeling.cache import WingsDynamicCache
from ..prompting import Prompt
from .features import FeatureCache

NOT_PIXELS = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids")
GRID_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


@dataclass
class Prefilled:
    """A freshly prefilled group: its cache and mask, each row's next position (and M-RoPE delta), and the logits
    of its last position [B, V] (plus the whole prompt's when asked, [B, T, V])."""

    cache: WingsDynamicCache
    mask: torch.Tensor  # [B, S]
    lengths: torch.Tensor  # [B] real tokens so far = the next token's text position
    deltas: torch.Tensor  # [B] M-RoPE offset of rotary ids over text positions (0 for 1D RoPE)
    logits: torch.Tensor  # [B, V] float32
    prompt_logits: torch.Tensor | None = None  # [B, T, V] float32, left-padded like the prompt


class ModelRunner:
    """Runs the served model's forwards for the running batch (only the scheduler thread calls it)."""

    def __init__(self, served, features: FeatureCache | None = None):
        self.served = served
        self.model = served.model
        self.codec = served.codec
        self.composed = getattr(self.model.config, "model_type", None) == "wings"
        self.mrope = not self.composed and getattr(self.codec, "arch", None) is not None and self.codec.arch.mrope
        self.text_config = served.facts.text_config
        self.features = features
        self.suppress = torch.tensor(sorted(served.facts.visual_ids), dtype=torch.long)  # never generated

    @property
    def device(self) -> torch.device:
        return self.model.device

    def record_kwargs(self, record: dict | None) -> dict:
        return {"wings_record": record} if record is not None else {}

    @torch.inference_mode()
    def prefill(self, prompts: list[Prompt], hashes: list[list[str]] | None = None, record: dict | None = None,
                full_logits: bool = False) -> Prefilled:
        inputs = self.codec.batch(prompts, self.device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        B = ids.shape[0]
        deltas = torch.zeros(B, dtype=torch.long, device=ids.device)
        kwargs: dict = {}
        if self.mrope:
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            grid = {k: inputs[k] for k in GRID_KEYS if k in inputs}
            if grid:
                vision, rope_deltas = self.model.model.get_rope_index(
                    ids, mm_token_type_ids=inputs["mm_token_type_ids"], attention_mask=mask, **grid)
                deltas = rope_deltas.reshape(B).to(ids.device, torch.long)
            else:
                vision = text[None].expand(3, -1, -1)
            positions = torch.cat([text[None], vision.to(text.device)])
            kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"]
        else:
            positions = inputs["position_ids"]
        pixels = {k: v for k, v in inputs.items() if k not in NOT_PIXELS}
        cache = WingsDynamicCache(config=self.text_config)
        with self._image_inputs(prompts, hashes, pixels) as extra:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                             logits_to_keep=0 if full_logits else 1, **extra, **kwargs,
                             **self.record_kwargs(record))
        logits = out.logits.float()
        return Prefilled(cache, mask, mask.long().sum(-1), deltas, logits[:, -1],
                         logits if full_logits else None)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: WingsDynamicCache, mask: torch.Tensor, lengths: torch.Tensor,
               deltas: torch.Tensor, record: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for every row: feed `tokens` [B]; return (logits [B, V], the grown mask)."""
        B = tokens.shape[0]
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        if self.mrope:
            text = lengths[None, :, None]  # [1, B, 1]
            positions = torch.cat([text, (lengths + deltas)[None, :, None].expand(3, B, 1)])
        else:
            positions = lengths[:, None]
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1, **self.record_kwargs(record))
        return out.logits[:, -1].float(), mask

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits as the samplers see them: image placeholders never chosen (`generate` suppresses them too)."""
        scores = logits.clone()
        scores[:, self.suppress.to(scores.device)] = float("-inf")
        return scores

    @contextlib.contextmanager
    def _image_inputs(self, prompts: list[Prompt], hashes: list[list[str]] | None, pixels: dict):
        """The pixel inputs of a prefill, or, through the feature cache, the projected image features of images seen
        before (`mm_encoder_outputs` for stock VLMs; the composed model's `get_image_features`, answered from the
        cache for this call's pixel tensor)."""
        if pixels.get("pixel_values") is None or self.features is None or hashes is None:
            yield pixels
            return
        feats = self.features.features_for(self, prompts, hashes)
        if feats is None:
            yield pixels
            return
        if self.composed:
            pixel_values = pixels["pixel_values"]
            joined = torch.cat(feats)

            def get_image_features(pv):
                if pv is pixel_values:
                    return joined
                return type(self.model).get_image_features(self.model, pv)

            self.model.__dict__["get_image_features"] = get_image_features
            try:
                yield pixels
            finally:
                self.model.__dict__.pop("get_image_features", None)
            return
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        rest = {k: v for k, v in pixels.items() if k != "pixel_values"}
        yield {**rest, "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}}

    @torch.inference_mode()
    def encode_images(self, prompt: Prompt) -> list[torch.Tensor] | None:
        """The projected features of one prompt's images, one tensor per image; None where this model's image
        features do not come apart per image (the feature cache then stays out of the way)."""
        if self.composed:
            feats = self.model.get_image_features(prompt.pixel_values.to(self.device))
            return list(feats)
        pixels = {k: v.to(self.device) for k, v in prompt.pixels.items()}
        out = self.model.get_image_features(**pixels)
        pooled = getattr(out, "pooler_output", None)
        if not isinstance(pooled, list | tuple) or len(pooled) != prompt.n_images:
            return None
        return list(pooled)
