"""Weight interpolation between two MLLMs of the same architecture (WiSE-FT: theta = (1 - a) theta_0 + a theta_1).

The study interpolates the LLaVA stage-1 model (projector aligned, LLM = the base LLM's weights, bit for bit) and
the full-tuned LLaVA stage 2, so `a = 0` is the base LLM with an aligned projector and `a = 1` the tuned model:
a learning-forgetting curve that costs no training, the one any method has to sit above.
"""

from __future__ import annotations

from pathlib import Path

import torch


def mix(start: torch.Tensor, end: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) start + alpha end, computed so that alpha 0 and 1 give `start` and `end` exactly (`torch.lerp`
    rounds at the ends); integer tensors (ids, counters) must be equal and are kept."""
    if not start.is_floating_point():
        if not torch.equal(start, end):
            raise ValueError("cannot interpolate integer tensors that differ")
        return start.clone()
    if alpha == 0.0:
        return start.clone()
    if alpha == 1.0:
        return end.clone()
    return ((1.0 - alpha) * start.double() + alpha * end.double()).to(start.dtype)


def interpolate_state(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """Interpolate two state dicts with the same keys and shapes (anything else is an error naming the key)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation weight must be in [0, 1], got {alpha}")
    if start.keys() != end.keys():
        only = sorted(set(start) ^ set(end))[:5]
        raise ValueError(f"the two models do not have the same weights (e.g. {only})")
    out = {}
    for key, a in start.items():
        b = end[key]
        if a.shape != b.shape:
            raise ValueError(f"weight {key}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        out[key] = mix(a, b, alpha)
    return out


def interpolate_dirs(start_dir: str | Path, end_dir: str | Path, alpha: float, out_dir: str | Path) -> Path:
    """Load two saved MLLM dirs, interpolate every weight, save the result (with `end_dir`'s processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .common import atomic_dir

    start = AutoModelForImageTextToText.from_pretrained(start_dir, dtype=torch.float32)
    end = AutoModelForImageTextToText.from_pretrained(end_dir, dtype=torch.float32)
    if start.config.mode != end.config.mode:
        raise ValueError(f"{start_dir} is a {start.config.mode}-mode model and {end_dir} a {end.config.mode} one")
    mixed = interpolate_state(start.state_dict(), end.state_dict(), alpha)
    end.load_state_dict(mixed)
    with atomic_dir(out_dir) as tmp:
        end.save_pretrained(tmp)
        AutoProcessor.from_pretrained(end_dir).save_pretrained(tmp)
    return Path(out_dir)
