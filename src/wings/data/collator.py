"""`WingsDataCollator`: pads a list of dataset items into the batch `WingsForConditionalGeneration.forward` takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formatting import IGNORE_INDEX


@dataclass
class WingsDataCollator:
    """Pads input_ids (pad_token_id), attention_mask (0) and labels (-100) to the longest item of the batch.

    `pixel_values` is every image of the batch concatenated in item order ([N, 3, H, W], the order of the
    image tokens in the flattened batch, as the model expects), or None when no item has an image.
    Right padding suits training; left padding suits generation (the model derives true positions from
    the attention mask either way).
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")

    @classmethod
    def from_processor(cls, processor, **kwargs) -> WingsDataCollator:
        pad = processor.tokenizer.pad_token_id
        if pad is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before collating")
        return cls(pad_token_id=pad, **kwargs)

    def _pad(self, rows: list[torch.Tensor], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, length - len(row):] = row
        return out

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor | None]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = [item["input_ids"] for item in items]
        masks = [item.get("attention_mask", torch.ones_like(item["input_ids"])) for item in items]
        batch = {
            "input_ids": self._pad(ids, self.pad_token_id, length),
            "attention_mask": self._pad(masks, 0, length),
        }
        with_labels = ["labels" in item for item in items]
        if any(with_labels) and not all(with_labels):
            raise ValueError("some items of the batch have labels and some do not")
        if all(with_labels):
            batch["labels"] = self._pad([item["labels"] for item in items], IGNORE_INDEX, length)
        pixels = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        batch["pixel_values"] = torch.cat(pixels) if pixels else None
        return batch
