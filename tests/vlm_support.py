"""Helpers for the tests of Wings on stock VLMs: tiny stock models of each family, real easy-vqa images, prompts."""

from __future__ import annotations

import functools

import torch
from PIL import Image

from wings.vlm import supported_types
from wings.vlm.tiny import build_tiny_vlm

ALL = supported_types()
QWEN = [kind for kind in ALL if kind.startswith("qwen")]


@functools.cache
def easyvqa_images(n: int = 4) -> tuple[Image.Image, ...]:
    """Real easy-vqa test images (64x64 PNGs), first n in id order."""
    from wings.data.easyvqa import load_split

    _, _, _, paths = load_split("test")
    return tuple(Image.open(paths[i]).convert("RGB") for i in sorted(paths)[:n])


def render(processor, parts: list[dict], system: str | None = None) -> str:
    """One user turn with `parts` ({"type": "image"} / {"type": "text", "text": ...}) and the generation prompt."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": parts}]
    return processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template,
                                                   add_generation_prompt=True, tokenize=False)


def image_batch(processor, texts: list[str], images: list[list], padding_side: str = "left") -> dict:
    """A padded batch from per-sample texts and image lists (an empty list: a text-only sample)."""
    kwargs = {"images": images} if any(images) else {}
    return dict(processor(text=texts, padding=True, padding_side=padding_side, return_tensors="pt", **kwargs))


def mixed_batch(processor) -> tuple[dict, list[dict]]:
    """A left-padded batch (image first, image after text, text only) and the same three samples alone."""
    a, b = easyvqa_images(2)
    samples = [
        (render(processor, [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]), [a]),
        (render(processor, [{"type": "text", "text": "is there a red circle in the image?"}, {"type": "image"}]), [b]),
        (render(processor, [{"type": "text", "text": "what is 3 + 4?"}]), []),
    ]
    batch = image_batch(processor, [t for t, _ in samples], [i for _, i in samples])
    alone = [image_batch(processor, [t], [i]) for t, i in samples]
    return batch, alone


def randomize_wings_(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Random learner and router weights, so the Wings path really changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(m in name for m in (".self_attn.visual.", ".self_attn.textual.", ".self_attn.router.")):
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def tiny(kind: str, seed: int = 0):
    return build_tiny_vlm(kind, seed=seed)


def init_wings_dir(kind: str, out, stage: int = 1, rank: int = 4, seed: int = 0):
    """A stage-0 Wings model directory of a tiny `kind` VLM (what `wings init-model --vlm` writes)."""
    import wings.vlm as vlm

    model, processor = build_tiny_vlm(kind, seed=seed)
    vlm.attach(model, rank=rank, stage=stage)
    model.save_pretrained(out)
    vlm.save_processor(processor, out)
    return out
