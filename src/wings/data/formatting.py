"""Messages -> token ids and labels through the processor's chat template, with image expansion and truncation.

Labels are -100 everywhere except the assistant's content and its `<|im_end|>`: the template wraps exactly that
in `{% generation %}`, and `tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)` turns it into a
token mask. Each `<image>` token becomes `processor.image_seq_length` image tokens (labels -100).

Truncation policy: the sequence is cut at `max_length` (the data report counts every cut record as `truncated`).
A cut that would remove any image token makes the record a bad one ("truncated_image"): a record never silently
loses an image or turns into a text-only one. If no assistant token is left after the cut, the record is
"over_long" (a bad record).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..processing import IMAGE_TOKEN
from .records import Record, load_image
from .report import BadRecord

IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_images: int  # images of the sample (truncation never removes one: that is a `truncated_image` skip)
    truncated: bool
    full_length: int = 0  # tokens before truncation


def chat_tokens(messages: Sequence[dict], processor) -> tuple[list[int], list[int]]:
    """Token ids of the formatted conversation and the assistant mask (1 = a token the model must learn)."""
    out = processor.tokenizer.apply_chat_template(
        list(messages), chat_template=processor.chat_template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):  # every record has a non-empty assistant turn, so this is the template's fault
        raise ValueError("the chat template marks no assistant token: it needs a {% generation %} block around "
                         "the assistant content (see wings.processing.CHATML_TEMPLATE)")
    return ids, mask


def encode_conversation(messages: Sequence[dict], processor, max_length: int) -> Encoded:
    """Format, mask, expand images and truncate one conversation (see the module docstring for the policy)."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    ids, mask = chat_tokens(messages, processor)
    image_id, span = processor.image_token_id, processor.image_seq_length
    expected = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    found = ids.count(image_id)
    if found != expected:
        raise BadRecord("placeholder_mismatch", f"{expected} `{IMAGE_TOKEN}` placeholders became {found} image tokens")

    input_ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for token, learn in zip(ids, mask, strict=True):
        if token == image_id:
            starts.append(len(input_ids))
            input_ids.extend([image_id] * span)
            labels.extend([IGNORE_INDEX] * span)
        else:
            input_ids.append(token)
            labels.append(token if learn else IGNORE_INDEX)

    full_length = len(input_ids)
    truncated = full_length > max_length
    if truncated:
        n_cut = sum(1 for s in starts if s + span > max_length)
        if n_cut:  # a record must never silently lose an image (or turn into a text-only one)
            raise BadRecord("truncated_image", f"{full_length} tokens after image expansion; cutting to "
                                               f"max_length={max_length} would drop {n_cut} of its {len(starts)} "
                                               "images")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    n_images = len(starts)
    if all(label == IGNORE_INDEX for label in labels):
        raise BadRecord("over_long", f"{len(ids) - found + found * span} tokens after image expansion; nothing "
                                     f"left to learn within max_length={max_length}")
    return Encoded(input_ids=input_ids, labels=labels, n_images=n_images, truncated=truncated,
                   full_length=full_length)


def build_sample(record: Record, processor, max_length: int) -> dict[str, torch.Tensor]:
    """One training sample: input_ids, attention_mask, labels [T] and pixel_values [n, 3, H, W] if it has images."""
    enc = encode_conversation(record.messages, processor, max_length)
    sample = {
        "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
        "attention_mask": torch.ones(len(enc.input_ids), dtype=torch.long),
        "labels": torch.tensor(enc.labels, dtype=torch.long),
    }
    if enc.n_images:
        images = [load_image(p) for p in record.images[: enc.n_images]]
        sample["pixel_values"] = processor.preprocess_images(images)
    return sample


@dataclass(frozen=True)
class WingsFormatter:
    """Records -> samples for a `WingsProcessor` model (the scan's `encode`, the dataset's `sample`); stock VLMs
    have their own (`wings.vlm.data.VLMFormatter`), with the same two methods."""

    processor: object
    max_length: int

    def encode(self, record: Record) -> Encoded:
        return encode_conversation(record.messages, self.processor, self.max_length)

    def sample(self, record: Record) -> dict[str, torch.Tensor]:
        return build_sample(record, self.processor, self.max_length)
