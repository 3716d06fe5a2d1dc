"""LLaVA-format records as training samples of a stock VLM, through the model's own chat template and processor.

A record's turns become the model's chat messages (`<image>` -> an image part), rendered with its chat template.
The rendered text is cut at the assistant replies (found by rendering the conversation reply by reply, so any
template that renders prefixes consistently works); each stretch of prompt text goes through the stock processor
with its own images, which expands every image into that family's tokens (AnyRes tiles, dynamic-resolution grids,
row/column markers) and returns its pixel tensors (`image_grid_thw`, `image_sizes`, `pixel_attention_mask`, ...);
each reply is tokenised alone and is the only thing with labels. Truncation follows the Wings pipeline's policy
(wings.data.formatting): a cut through an image skips the record, a cut with nothing left to learn too.

`VLMDataCollator` pads ids/labels/masks (`mm_token_type_ids` as well) and joins the pixel tensors the way the
family batches them: per image (concatenated, trailing dims zero-padded: LLaVA-NeXT's tile count), or per sample
(Idefics3/SmolVLM: `[B, images, ...]`, zero images standing in for the missing ones, which the model skips).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.formatting import IGNORE_INDEX, Encoded
from ..data.records import Record, load_image
from ..data.report import BadRecord
from ..processing import IMAGE_TOKEN
from .registry import VLMArch

TEXT_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
COUNT_KEYS = ("batch_num_images",)  # one number per sample (LLaVA-OneVision): summed over a sample's pieces


def chat_messages(record: Record) -> list[dict]:
    """The record's turns as chat messages with image parts, in the order of its images."""
    out = []
    for message in record.messages:
        chunks = message["content"].split(IMAGE_TOKEN)
        if len(chunks) > 1 and message["role"] == "assistant":
            raise BadRecord("image_in_reply", "an `<image>` placeholder in an assistant turn (a model cannot be "
                                              "trained to produce an image)")
        parts: list[dict] = []
        for i, chunk in enumerate(chunks):
            if i:
                parts.append({"type": "image"})
            if chunk:
                parts.append({"type": "text", "text": chunk})
        out.append({"role": message["role"], "content": parts})
    return out


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)


def segments(processor, messages: list[dict]) -> list[tuple[str, bool, int]]:
    """(text, is_reply, images in it) pieces of the rendered conversation, in order."""
    full = render(processor, messages)
    pieces, start, images = [], 0, 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            images += sum(part["type"] == "image" for part in message["content"])
            continue
        before = render(processor, messages[:i], add_generation_prompt=True)
        upto = render(processor, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= start):
            raise BadRecord("template_mismatch", "the chat template does not render the conversation reply by "
                                                 "reply (a prefix renders differently inside the whole), so the "
                                                 "replies to learn cannot be found")
        reply = upto[len(before):].rstrip()
        pieces.append((full[start:len(before)], False, images))
        pieces.append((reply, True, 0))
        start, images = len(before) + len(reply), 0
    if start < len(full):
        pieces.append((full[start:], False, images))
    return [p for p in pieces if p[0] or p[2]]


@dataclass
class VLMFormatter:
    """Records -> samples for one stock VLM (its processor, family and placeholder ids)."""

    processor: object
    arch: VLMArch
    visual_ids: list[int]
    max_length: int

    def encode(self, record: Record) -> Encoded:
        """What the scan needs: token ids and labels after expansion and truncation (images are processed too:
        a dynamic-resolution family's token count depends on each image's size)."""
        sample = self._tokens(record)
        return Encoded(input_ids=sample["input_ids"].tolist(), labels=sample["labels"].tolist(),
                       n_images=len(record.images), truncated=sample.pop("_truncated"),
                       full_length=sample.pop("_full_length"))

    def sample(self, record: Record) -> dict[str, torch.Tensor]:
        sample = self._tokens(record)
        sample.pop("_truncated")
        sample.pop("_full_length")
        return sample

    def _tokens(self, record: Record) -> dict:
        messages = chat_messages(record)
        images = [load_image(path) for path in record.images]
        ids, labels, extras, taken = [], [], {}, 0
        tokenizer = self.processor.tokenizer
        for text, is_reply, n_images in segments(self.processor, messages):
            if is_reply:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece
                _extend(extras, "mm_token_type_ids", [0] * len(piece))
                continue
            kwargs = {"images": [images[taken:taken + n_images]]} if n_images else {}
            taken += n_images
            out = self.processor(text=[text], add_special_tokens=False, return_tensors="pt", **kwargs)
            piece = out["input_ids"][0].tolist()
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
            _extend(extras, "mm_token_type_ids", out["mm_token_type_ids"][0].tolist()
                    if "mm_token_type_ids" in out else [0] * len(piece))
            for key, value in out.items():
                if key not in TEXT_KEYS and torch.is_tensor(value):
                    extras.setdefault(key, []).append(value)
        if taken != len(images):
            raise BadRecord("placeholder_mismatch", f"the chat template rendered {taken} of the record's "
                                                    f"{len(images)} images")
        full_length = len(ids)
        truncated = full_length > self.max_length
        if truncated:
            visual = [i for i, t in enumerate(ids) if t in self.visual_ids]
            if visual and visual[-1] >= self.max_length:
                cut = sum(1 for i in visual if i >= self.max_length)
                raise BadRecord("truncated_image", f"{full_length} tokens after image expansion; cutting to "
                                                   f"max_length={self.max_length} would drop {cut} image tokens")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise BadRecord("over_long", f"{full_length} tokens after image expansion; nothing left to learn "
                                         f"within max_length={self.max_length}")
        sample = {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
                  "labels": torch.tensor(labels), "_truncated": truncated, "_full_length": full_length}
        types = extras.pop("mm_token_type_ids")
        if self.arch.mrope:  # the Qwen-VL families want it (0 text, 1 image) whenever images are given
            sample["mm_token_type_ids"] = torch.tensor(types[: len(ids)])
        for key, parts in extras.items():
            sample[key] = _join(parts, dim=1 if self.arch.pixels_per_sample else 0, summed=key in COUNT_KEYS)
        return sample


def _extend(extras: dict, key: str, values: list[int]) -> None:
    extras.setdefault(key, []).extend(values)


def _join(parts: list[torch.Tensor], dim: int, summed: bool = False) -> torch.Tensor:
    """Concatenate along `dim`, zero-padding the dims after it to their largest size (or sum count tensors)."""
    if summed:
        return sum(parts[1:], parts[0].clone())
    width = [max(p.shape[d] for p in parts) for d in range(parts[0].ndim)]
    padded = []
    for p in parts:
        pad = []
        for d in reversed(range(p.ndim)):
            pad += [0, width[d] - p.shape[d] if d > dim else 0]
        padded.append(F.pad(p, pad) if any(pad) else p)
    return torch.cat(padded, dim=dim)


@dataclass
class VLMDataCollator:
    """Pads the text tensors to the batch's longest sample and joins the pixel tensors the family's way."""

    pad_token_id: int
    arch: VLMArch
    padding_side: str = "right"

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        length = max(len(item["input_ids"]) for item in items)
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
        batch = {}
        for key, value in fill.items():
            if key in items[0]:
                batch[key] = torch.stack([self._pad(item[key], value, length) for item in items])
        pixel_keys = sorted({k for item in items for k in item if k not in TEXT_KEYS})
        for key in pixel_keys:
            batch[key] = self.join_pixels(key, [item.get(key) for item in items])
        return batch

    def _pad(self, row: torch.Tensor, value: int, length: int) -> torch.Tensor:
        pad = (0, length - len(row)) if self.padding_side == "right" else (length - len(row), 0)
        return F.pad(row, pad, value=value)

    def join_pixels(self, key: str, values: list[torch.Tensor | None]) -> torch.Tensor:
        """One pixel tensor of the batch from each sample's (None: a sample without images)."""
        present = [v for v in values if v is not None]
        if key in COUNT_KEYS:
            return torch.cat([v if v is not None else present[0].new_zeros(present[0].shape) for v in values])
        if not self.arch.pixels_per_sample:
            return _join(present, dim=0)
        # [1, images, ...] per sample -> [B, most images, ...], zero-padded; a text-only sample gets one all-zero
        # image (the family's model drops all-zero images)
        return _join([v if v is not None else _zeros_like_one(present[0]) for v in values], dim=0)


def _zeros_like_one(example: torch.Tensor) -> torch.Tensor:
    """One all-zero image in a per-sample pixel tensor ([1, 1, ...]): the model drops all-zero images."""
    return example.new_zeros((1, 1, *example.shape[2:]))
