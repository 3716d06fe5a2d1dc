"""The demo's vision encoder: a tiny SigLIP made meaningful offline by supervised pretraining on easy-vqa images.

No pretrained vision weights ship in any package we can install, so the encoder learns to tell the shape
(3 classes) and colour (8 classes) of each easy-vqa training image, labels read off the images' own questions
(`wings.data.easyvqa.image_labels`). Two linear heads read the mean of the patch features the MLLM's projector
will see (`hidden_states[feature_layer]`), so exactly those features become informative. Accuracy is reported on
the held-out test images, next to a linear probe of the same architecture at random init (the "before").

Default size: 32x32 input (easy-vqa's 64x64 PNGs downscaled; a shape stays recognisable, see the probe numbers),
patch 8 -> 16 image tokens: the LLM sequence is ~16 + 30 tokens instead of ~64 + 30, which roughly halves
every MLLM training and evaluation step on a CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

from ..data.easyvqa import COLOURS, SHAPES, image_labels, load_split
from .common import atomic_dir

IGNORE = -100


@dataclass
class VisionSpec:
    """Encoder size and pretraining schedule (defaults: ~0.1M parameters, ~16 tokens per image)."""

    image_size: int = 32
    patch_size: int = 8
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    feature_layer: int = -1  # the hidden state the MLLM will read; compose with vision_feature_layer=this
    steps: int = 400  # shape needs ~400 steps (colour is learnt in ~50); measured in the module docstring
    batch_size: int = 128
    lr: float = 5e-3
    seed: int = 0

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_encoder(spec: VisionSpec) -> tuple[SiglipVisionModel, SiglipImageProcessorPil]:
    torch.manual_seed(spec.seed)
    config = SiglipVisionConfig(image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.hidden,
                                intermediate_size=spec.hidden * 4, num_hidden_layers=spec.layers,
                                num_attention_heads=spec.heads)
    processor = SiglipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    return SiglipVisionModel(config), processor


def load_images(split: str, processor, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values [N, 3, S, S] of a split's images and labels [N, 2] (shape index, colour index; -100 unknown)."""
    _, _, _, paths = load_split(split)
    labels = image_labels(split)
    ids = sorted(paths)[:limit]
    images = []
    for i in ids:
        with Image.open(paths[i]) as img:
            images.append(img.convert("RGB"))
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    y = torch.tensor([[SHAPES.index(labels[i]["shape"]) if labels[i]["shape"] else IGNORE,
                       COLOURS.index(labels[i]["colour"]) if labels[i]["colour"] else IGNORE] for i in ids])
    return pixels, y


class ShapeColourHeads(nn.Module):
    """Two linear heads over the mean of the encoder's patch features at `feature_layer`."""

    def __init__(self, encoder: SiglipVisionModel, feature_layer: int):
        super().__init__()
        self.encoder, self.feature_layer = encoder, feature_layer
        hidden = encoder.config.hidden_size
        self.shape = nn.Linear(hidden, len(SHAPES))
        self.colour = nn.Linear(hidden, len(COLOURS))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.encoder(pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer].mean(1)  # [N, P, d] -> [N, d]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features(pixel_values)
        return self.shape(pooled), self.colour(pooled)


def _loss(model: ShapeColourHeads, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    shape_logits, colour_logits = model(x)
    ce = nn.functional.cross_entropy
    return ce(shape_logits, y[:, 0], ignore_index=IGNORE) + ce(colour_logits, y[:, 1], ignore_index=IGNORE)


@torch.no_grad()
def head_accuracy(model: ShapeColourHeads, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> dict[str, float]:
    model.eval()
    preds = [torch.stack([h.argmax(-1) for h in model(x[s:s + batch])], -1) for s in range(0, len(x), batch)]
    pred = torch.cat(preds)
    out = {}
    for k, name in enumerate(("shape", "colour")):
        known = y[:, k] != IGNORE
        out[name] = float((pred[known, k] == y[known, k]).float().mean())
    return out


def pretrain_encoder(spec: VisionSpec, train: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor] | None = None, progress=None):
    """Train encoder + heads on (pixels, labels) with AdamW + cosine; returns (encoder, stats).

    A plain loop, not Trainer: the whole data set is one preloaded tensor and each step takes milliseconds, so
    the loop is shorter than the Trainer glue and has no per-step overhead. `progress(step, loss)` is called
    every 10 steps if given.
    """
    encoder, _ = build_encoder(spec)
    model = ShapeColourHeads(encoder, spec.feature_layer)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(spec.seed)
    x, y = train
    losses: list[tuple[int, float]] = []
    start = time.perf_counter()
    model.train()
    for step in range(1, spec.steps + 1):
        idx = torch.randint(0, len(x), (spec.batch_size,), generator=gen)
        loss = _loss(model, x[idx], y[idx])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == spec.steps:
            losses.append((step, loss.item()))
            if progress is not None:
                progress(step, losses[-1][1])
    seconds = time.perf_counter() - start
    stats = {"seconds": round(seconds, 2), "ms_per_step": round(1000 * seconds / spec.steps, 1),
             "params": sum(p.numel() for p in encoder.parameters()), "losses": losses, "spec": asdict(spec),
             "train_accuracy": head_accuracy(model, x[:1000], y[:1000])}
    if test is not None:
        stats["test_accuracy"] = head_accuracy(model, *test)
    return encoder.eval(), stats


def linear_probe(encoder: SiglipVisionModel, feature_layer: int, train: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], steps: int = 100) -> dict[str, float]:
    """Fit fresh linear heads (L-BFGS) on *frozen* pooled features; test accuracy per label."""
    probe = ShapeColourHeads(encoder, feature_layer)
    with torch.no_grad():
        f_train, f_test = probe.features(train[0]), probe.features(test[0])
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6  # standardise so L-BFGS converges in few steps
    f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
    out = {}
    for k, (name, n_cls) in enumerate((("shape", len(SHAPES)), ("colour", len(COLOURS)))):
        known = train[1][:, k] != IGNORE
        head = nn.Linear(f_train.shape[1], n_cls)
        opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure(head=head, opt=opt, known=known, k=k):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(head(f_train[known]), train[1][known, k])
            loss = loss + 1e-4 * head.weight.pow(2).sum()  # a little L2: separable classes would diverge
            loss.backward()
            return loss

        opt.step(closure)
        test_known = test[1][:, k] != IGNORE
        with torch.no_grad():
            out[name] = float((head(f_test[test_known]).argmax(-1) == test[1][test_known, k]).float().mean())
    return out


def save_encoder(encoder: SiglipVisionModel, processor, out_dir: str | Path, stats: dict | None = None) -> Path:
    """Save SiglipVisionModel + image processor as an HF directory (atomically), with the pretraining stats."""
    with atomic_dir(out_dir) as tmp:
        encoder.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if stats is not None:
            (tmp / "pretrain_stats.json").write_text(json.dumps(stats, indent=2))
    return Path(out_dir)
