"""`WingsProcessor`: tokenizer + image processor + ChatML chat template, expanding `<image>` to its tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from .images import DEFAULT_LIMITS, ImageLimits, SourcePolicy, open_image

IMAGE_TOKEN = "<image>"
# Padding to a square allocates max(w, h)^2 pixels; sides beyond this are first reduced (aspect kept), which only
# changes images far larger than any encoder's input, and bounds the canvas at 16 Mpx.
PAD_MAX_SIDE = 4096

# ChatML (Qwen's layout, as in the released model). Content is a string with inline `<image>`, or HF-style
# parts [{"type": "image"}, {"type": "text", "text": ...}]. `{% generation %}` marks what a model must learn
# to say (assistant content + end-of-turn), so `return_assistant_tokens_mask=True` gives the label mask.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = namespace(v='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.v = text.v + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.v = text.v + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = text.v -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- text + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- text + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of `fill` colour (LLaVA's expand2square)."""
    if max(image.size) > PAD_MAX_SIDE:
        image = image.copy()
        image.thumbnail((PAD_MAX_SIDE, PAD_MAX_SIDE))
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class WingsProcessor(ProcessorMixin):
    """Turns text with `<image>` placeholders plus images into `input_ids`, `attention_mask`, `pixel_values`.

    Args:
        image_processor: any HF image processor (SigLIP/CLIP `*Pil` classes work without torchvision).
        tokenizer: the LLM's tokenizer, with `<image>` added as a special token.
        image_seq_length: tokens per image (the model config's `image_seq_length`).
        image_pad_mode: "pad" pads images to square with the processor's mean colour, "resize" squashes.
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 1,
                 image_pad_mode: str = "pad", chat_template: str | None = None, **kwargs):
        if image_pad_mode not in ("pad", "resize"):
            raise ValueError(f"image_pad_mode must be 'pad' or 'resize', got {image_pad_mode!r}")
        self.image_seq_length = image_seq_length
        self.image_pad_mode = image_pad_mode
        self.image_token = IMAGE_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHATML_TEMPLATE, **kwargs)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token; add it as a special token first")

    @property
    def fill_colour(self) -> tuple[int, int, int]:
        mean = getattr(self.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        return tuple(int(255 * m) for m in mean)

    def preprocess_images(self, images: Sequence, limits: ImageLimits = DEFAULT_LIMITS,
                          policy: SourcePolicy | None = None) -> torch.Tensor:
        """Images -> pixel_values [N, 3, H, W] (RGB, padded to square or resized, then normalised).

        Each image is a PIL image or a source `wings.images.open_image` reads (path, data URL, bytes; http(s)
        URLs as transformers' `load_image` does, unless `policy` says otherwise), checked against `limits`."""
        policy = policy if policy is not None else SourcePolicy(allow_remote=True)
        prepared = []
        for image in images:
            image = open_image(image, limits, policy)
            if self.image_pad_mode == "pad":
                image = pad_to_square(image, self.fill_colour)
            prepared.append(image)
        return self.image_processor(prepared, return_tensors="pt")["pixel_values"]

    def expand_placeholders(self, text: str) -> str:
        return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_seq_length)

    def __call__(self, text: str | list[str] | None = None, images=None, padding: bool | str = True,
                 padding_side: str | None = None, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """text: one string or a batch; images: a flat list in placeholder order, or one list per sample."""
        if text is None:
            raise ValueError("WingsProcessor needs text (with one `<image>` per image)")
        texts = [text] if isinstance(text, str) else list(text)
        flat = flatten_images(images, texts)
        placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
        if placeholders != len(flat):
            raise ValueError(f"the text has {placeholders} `<image>` placeholders but {len(flat)} images were given")
        encoded = self.tokenizer(
            [self.expand_placeholders(t) for t in texts], padding=padding, padding_side=padding_side,
            return_tensors=return_tensors, add_special_tokens=False, **kwargs,
        )
        data = dict(encoded)
        if flat:
            data["pixel_values"] = self.preprocess_images(flat)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def flatten_images(images, texts: list[str]) -> list:
    """Accept None, one image, a flat list, or per-sample lists (checked against each sample's placeholders)."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):
        if len(images) != len(texts):
            raise ValueError(f"got image lists for {len(images)} samples but {len(texts)} texts")
        for i, (sample_text, sample_images) in enumerate(zip(texts, images, strict=True)):
            if sample_text.count(IMAGE_TOKEN) != len(sample_images):
                raise ValueError(
                    f"sample {i}: the text has {sample_text.count(IMAGE_TOKEN)} `<image>` placeholders "
                    f"but {len(sample_images)} images were given"
                )
        return [img for sample in images for img in sample]
    return images
