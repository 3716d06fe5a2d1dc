"""MLLM-LAWS (Layer-level Attention Weights) and the attention shift, as defined in the Wings paper.

For an input x with one image, and each decoder layer l, the LAWS entry of key segment V* is the attention
mass that the query tokens put on the keys of V* (text before the image, the image, text after the image):

    a^l_V*(x) = 1/|Q| sum_{i in Q} 1/H sum_h sum_{j in V*} P^l_h[i, j]

(Q = all non-padding tokens by default, or only the text after the image; heads averaged; divided by |Q| so
the three curves of a single-image input sum to 1 per layer. The paper sums over i; Pearson's r is scale-free,
so the shift is the same.) Attention shift = 1 - E_x[ pearson_l(LAWS_before(x), LAWS_after(x)) ], in [0, 2].

Only one layer's probabilities ever exist: the main attention runs eagerly, and a forward hook on each
layer's attention module reduces its [B, H, T, S] weights to [B, 3] segment masses and drops them at once.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..model_kinds import language_model, model_facts
from ..modeling.inject import decoder_layers
from ..modeling.router import SEG_IMAGE, SEG_TEXT_AFTER, SEG_TEXT_BEFORE
from ..modeling.state import token_segments
from ..vlm.registry import visual_mask
from .models import EvalModel
from .tasks import Task

SEGMENTS = {"text_before": SEG_TEXT_BEFORE, "image": SEG_IMAGE, "text_after": SEG_TEXT_AFTER}
QUERY_SETS = ("all", "after")


def main_attention_modules(llm) -> list[torch.nn.Module]:
    """Each decoder layer's own attention module (Wings parts hang off it; its weights output is the stock one)."""
    return [layer.self_attn for layer in decoder_layers(llm)]


def segment_ids(input_ids: torch.Tensor, mask: torch.Tensor, visual_ids: list[int],
                image_span: int | None) -> torch.Tensor:
    """[B, S] SEG_* per key. Multi-image inputs of a composed model (`image_span` tokens per image): only the first
    image's span counts as the image; tokens of later images belong to no segment (SEG_PAD), and text after the
    first image is `text_after`. A stock VLM's images vary in length (tiles, grids): all its image tokens count."""
    is_image = visual_mask(input_ids, visual_ids)
    seg = token_segments(is_image, mask.bool(), None)
    if image_span is None:
        return seg
    later_image = is_image & (is_image.long().cumsum(dim=1) > image_span)
    return seg.masked_fill(later_image, 0)


class LawsRecorder:
    """Forward hooks that turn each layer's eager attention weights into per-segment masses."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self.key_onehot: torch.Tensor | None = None  # [B, S, 3]
        self.query_weight: torch.Tensor | None = None  # [B, T], rows sum to 1
        self.masses: list[torch.Tensor] = []
        self._handles = []

    def set_batch(self, segments: torch.Tensor, query_mask: torch.Tensor) -> None:
        self.key_onehot = torch.stack([segments == s for s in SEGMENTS.values()], dim=-1).float()
        q = query_mask.float()
        self.query_weight = q / q.sum(dim=1, keepdim=True).clamp(min=1)
        self.masses = []

    def _hook(self, module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("LAWS: the attention module returned no weights; it must run with eager attention")
        per_key = weights.float().mean(dim=1)  # heads averaged: [B, T, S]
        # sum_i w_i sum_j P[i, j] 1[j in seg]: reduced right here, so this layer's [B, H, T, S] is dropped now
        self.masses.append(torch.einsum("bt,bts,bsc->bc", self.query_weight, per_key, self.key_onehot))
        return (output[0], None, *output[2:])

    def __enter__(self) -> LawsRecorder:
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextmanager
def eager_attention(model, llm):
    """Switch the model to eager attention (weights are only returned there) and restore it afterwards; `llm` is
    its language model, which composite models may not switch along."""
    llm_config = llm.config
    previous = llm_config._attn_implementation
    model.set_attn_implementation("eager")
    if llm_config._attn_implementation != "eager":
        llm.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if previous and previous != "eager":
            model.set_attn_implementation(previous)
            if llm_config._attn_implementation != previous:
                llm.set_attn_implementation(previous)


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's r across layers; None when either vector is constant (r is undefined)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    dx, dy = [a - mx for a in x], [b - my for b in y]
    sxx, syy = sum(a * a for a in dx), sum(b * b for b in dy)
    if sxx <= 1e-24 or syy <= 1e-24:
        return None
    return sum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(sxx * syy)


@torch.no_grad()
def compute_laws(em: EvalModel, task: Task, queries: str = "all", batch_size: int = 4, max_items: int | None = None,
                 progress: bool = True) -> dict:
    if not em.multimodal:
        raise ValueError(f"LAWS needs a multimodal model; {em.path} is a text-only LLM")
    if queries not in QUERY_SETS:
        raise ValueError(f"queries must be one of {QUERY_SETS}, got {queries!r}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1 (or None for all), got {max_items}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = task.items[:max_items] if max_items else task.items
    for item in items:
        if not item.all_images:
            raise ValueError(f"{task.path} record {item.id!r} has no image; LAWS needs one image per record")
    llm = language_model(em.model)
    recorder = LawsRecorder(main_attention_modules(llm))
    image_span = em.model.config.image_seq_length if em.model.config.model_type == "wings" else None
    per_item: list[dict] = []
    bar = tqdm(total=len(items), desc=f"LAWS {em.name}", disable=not progress)
    visual_ids = list(model_facts(em.model).visual_ids)
    with eager_attention(em.model, llm), recorder:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            inputs = em.batch([em.encode_item(item)[0] for item in batch])
            segments = segment_ids(inputs["input_ids"], inputs["attention_mask"], visual_ids, image_span)
            query_mask = inputs["attention_mask"].bool() if queries == "all" else segments == SEG_TEXT_AFTER
            recorder.set_batch(segments, query_mask)
            em.model(**inputs, use_cache=False, logits_to_keep=1)
            masses = torch.stack(recorder.masses, dim=1).cpu()  # [B, L, 3]
            for item, m in zip(batch, masses, strict=True):
                laws = {name: m[:, k].tolist() for k, name in enumerate(SEGMENTS)}
                per_item.append({"id": item.id, "laws": laws, "pearson": pearson(laws["text_before"],
                                                                                 laws["text_after"])})
            bar.update(len(batch))
    bar.close()
    return summarise(per_item, queries)


def summarise(per_item: list[dict], queries: str) -> dict:
    rs = [p["pearson"] for p in per_item if p["pearson"] is not None]
    n_layers = len(per_item[0]["laws"]["image"]) if per_item else 0
    mean_curves = {name: [sum(p["laws"][name][l] for p in per_item) / len(per_item) for l in range(n_layers)]
                   for name in SEGMENTS} if per_item else {}
    return {
        "attention_shift": 1 - sum(rs) / len(rs) if rs else None,
        "pearson_mean": sum(rs) / len(rs) if rs else None,
        "n_items": len(per_item),
        "n_used": len(rs),
        "n_undefined": len(per_item) - len(rs),  # a constant LAWS vector: Pearson's r is undefined
        "n_layers": n_layers,
        "settings": {"queries": queries, "heads": "mean", "normalisation": "mass per query token",
                     "multi_image": "first image's span"},
        "laws_mean": mean_curves,
        "items": per_item,
    }
