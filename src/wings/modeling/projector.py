"""Projectors from vision features to the LLM's embedding space (LLaVA's naming: linear, mlp{N}x_gelu, identity)."""

from __future__ import annotations

import re

from torch import nn


def build_projector(projector_type: str, vision_hidden: int, text_hidden: int) -> nn.Module:
    """Return the projector named by `projector_type`; raise ValueError naming the type if unknown."""
    if projector_type == "linear":
        return nn.Linear(vision_hidden, text_hidden)
    if projector_type == "identity":
        if vision_hidden != text_hidden:
            raise ValueError(
                f"projector_type='identity' needs equal widths, got vision {vision_hidden} vs text {text_hidden}"
            )
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match is None:
        raise ValueError(
            f"unknown projector_type {projector_type!r}; expected 'linear', 'identity' or 'mlp{{N}}x_gelu'"
        )
    depth = int(match.group(1))
    if depth < 1:
        raise ValueError(f"projector_type {projector_type!r} needs at least one layer")
    # Same module indices as LLaVA's mlp2x_gelu (0 = Linear, 1 = GELU, 2 = Linear) so checkpoints map 1:1.
    layers: list[nn.Module] = [nn.Linear(vision_hidden, text_hidden)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(text_hidden, text_hidden)]
    return nn.Sequential(*layers)
