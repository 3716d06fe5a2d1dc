"""Chat messages + images -> model inputs, one codec per kind of model, for every command that prompts a model.

Messages are chat-template messages whose content is a string with inline `<image>` placeholders (LLaVA's
convention, what task files and the chat hold) or a list of HF parts (`{"type": "image"}`,
`{"type": "text", ...}`). A codec renders them with the model's chat template, expands each image into the model's
image tokens, and returns a `Prompt`: the token ids plus the other tensors the model takes for them (pixels; a
stock VLM's `image_grid_thw`, `image_sizes`, `pixel_attention_mask`; its per-token `mm_token_type_ids`).
`codec.batch(prompts)` pads prompts (left by default: the ends line up, as generation and continuation scoring
want) and joins their pixel tensors the way the model batches them.

- `WingsCodec`: a composed Wings/LLaVA model and its `WingsProcessor`;
- `VLMCodec`: a stock VLM (Wings attached or not) and its stock processor (wings.vlm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .processing import IMAGE_TOKEN


@dataclass
class Prompt:
    """An encoded prompt: token ids (images expanded) and the other model inputs that belong to them."""

    ids: list[int]
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values and its companions
    token_types: list[int] | None = None  # mm_token_type_ids of a Qwen-VL-style model, aligned with ids
    n_images: int = 0

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return self.pixels.get("pixel_values")

    def extended(self, ids: Sequence[int]) -> Prompt:
        """This prompt followed by text tokens `ids` (a continuation to score, a generated reply)."""
        types = None if self.token_types is None else self.token_types + [0] * len(ids)
        return Prompt(self.ids + list(ids), self.pixels, types, self.n_images)


def as_parts(content) -> list[dict]:
    """Message content as HF parts: a string's inline `<image>` placeholders become image parts."""
    if not isinstance(content, str):
        return list(content)
    parts: list[dict] = []
    for i, chunk in enumerate(content.split(IMAGE_TOKEN)):
        if i:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def count_images(messages: Sequence[dict]) -> int:
    return sum(part.get("type") == "image" for m in messages for part in as_parts(m["content"]))


class Codec:
    """The common part: tokenizer and template access, padding."""

    takes_position_ids = True

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer

    @property
    def chat_template(self) -> str:
        return self.processor.chat_template

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return 0 if pad is None else int(pad)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, messages: Sequence[dict], images: Sequence = (), add_generation_prompt: bool = True) -> Prompt:
        n = count_images(messages)
        if n != len(images):
            raise ValueError(f"the messages have {n} image placeholders but {len(images)} images were given")
        return self._encode(self.render(self._messages(messages), add_generation_prompt), list(images))

    def batch(self, prompts: Sequence[Prompt], device=None, padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Padded `input_ids`, `attention_mask`, `position_ids` (true positions: padding does not shift them; not
        for M-RoPE models, which derive their 3D ids from the mask) and the joined pixel tensors, on `device`."""
        width = max(len(p.ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        types = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            span = slice(width - len(p.ids), width) if padding_side == "left" else slice(0, len(p.ids))
            ids[row, span] = torch.tensor(p.ids, dtype=torch.long)
            mask[row, span] = 1
            if p.token_types is not None:
                types[row, span] = torch.tensor(p.token_types, dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.takes_position_ids:
            out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if any(p.token_types is not None for p in prompts):
            out["mm_token_type_ids"] = types
        out.update(self._join_pixels(prompts))
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def _messages(self, messages: Sequence[dict]) -> list[dict]:
        return list(messages)

    def _encode(self, text: str, images: list) -> Prompt:
        raise NotImplementedError

    def _join_pixels(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class WingsCodec(Codec):
    """A composed Wings model: `WingsProcessor` (each `<image>` -> image_seq_length tokens, pixels [N, 3, H, W])."""

    def _encode(self, text: str, images: list) -> Prompt:
        out = self.processor(text=[text], images=[images] if images else None, padding=False)
        pixels = {"pixel_values": out["pixel_values"]} if images else {}
        return Prompt(out["input_ids"][0].tolist(), pixels, None, len(images))

    def _join_pixels(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        pix = [p.pixel_values for p in prompts if p.pixel_values is not None]
        return {"pixel_values": torch.cat(pix)} if pix else {}


class VLMCodec(Codec):
    """A stock VLM and its stock processor: the family's own image expansion and pixel tensors (wings.vlm.data
    joins them per image, or per sample for Idefics3/SmolVLM)."""

    def __init__(self, processor, arch):
        super().__init__(processor)
        self.arch = arch
        self.takes_position_ids = not arch.mrope

    def _messages(self, messages: Sequence[dict]) -> list[dict]:
        return [{**m, "content": as_parts(m["content"])} for m in messages]

    def _encode(self, text: str, images: list) -> Prompt:
        kwargs = {"images": [images]} if images else {}
        out = self.processor(text=[text], add_special_tokens=False, return_tensors="pt", **kwargs)
        ids = out["input_ids"][0].tolist()
        types = out["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in out else (
            [0] * len(ids) if self.arch.mrope else None)
        skip = ("input_ids", "attention_mask", "mm_token_type_ids")
        pixels = {k: v for k, v in out.items() if k not in skip and torch.is_tensor(v)} if images else {}
        return Prompt(ids, pixels, types, len(images))

    def _join_pixels(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        from .vlm.data import VLMDataCollator

        keys = sorted({k for p in prompts for k in p.pixels})
        collate = VLMDataCollator(self.pad_id, self.arch)
        return {k: collate.join_pixels(k, [p.pixels.get(k) for p in prompts]) for k in keys}


def codec_for(model: nn.Module, processor) -> Codec:
    """The codec of a loaded model: composed Wings/LLaVA, or a stock VLM (Wings attached or not)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "wings":
        return WingsCodec(processor)
    from .vlm.registry import arch_for, base_model_type

    return VLMCodec(processor, arch_for(base_model_type(model_type)))
