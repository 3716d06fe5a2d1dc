"""The released AIDC-AI/Wings key layout: what it holds (inferred from key names) and how keys map onto ours.

Official (a `WingsQwen2ForCausalLM` state dict)            ours (`WingsForConditionalGeneration`)
  model.layers.{i}.attn_pool.{q,k,v,o}_proj.0.weight [r,H]    language_model.model.layers.{i}.self_attn
                                                              .visual.{q,k,v,o}_proj.down.weight
  model.layers.{i}.attn_pool.{q,k,v,o}_proj.1.weight [H,r]    ... .visual.{..}_proj.up.weight
  model.layers.{i}.attn_t_pool.*                              ... .textual.*
  model.layers.{i}.reweight_module.linear.{weight,bias}       ... .self_attn.router.linear.{weight,bias}
  model.layers.{i}.self_attn.*                                ... .self_attn.*  (stock names in every mode)
  model.mm_projector.{n}.*                                    projector.{n}.*
  model.vision_tower.vision_tower.vision_model.*              vision_tower.*  (transformers 5 has no `vision_model.`)
  model.*, lm_head.weight                                     language_model.model.*, language_model.lm_head.weight
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

LEARNER_RE = re.compile(r"^model\.layers\.(\d+)\.(attn_pool|attn_t_pool)\.([qkvo]_proj)\.([01])\.weight$")
ROUTER_RE = re.compile(r"^model\.layers\.(\d+)\.reweight_module\.linear\.(weight|bias)$")
PROJECTOR_RE = re.compile(r"^model\.mm_projector\.(\d+)\.(weight|bias)$")
VISION_PREFIX = "model.vision_tower.vision_tower."
VISION_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.")
LEARNER_NAMES = {"attn_pool": "visual", "attn_t_pool": "textual"}
LOW_RANK_NAMES = {"0": "down", "1": "up"}


@dataclass
class OfficialLayout:
    """What a released checkpoint contains, read off its key names and shapes."""

    learner_layers: list[int]
    has_visual: bool
    has_textual: bool
    has_router: bool
    rank: int
    router_width: int | None
    projector_type: str
    vision_layers: int


def infer_layout(tensors: dict[str, torch.Tensor]) -> OfficialLayout:
    """Learner layers, learner kinds, router presence and width, rank and projector depth."""
    layers: dict[str, set[int]] = {"attn_pool": set(), "attn_t_pool": set()}
    ranks, router_layers, router_widths, projector_linears = set(), set(), set(), set()
    vision_layers = set()
    for name, value in tensors.items():
        if m := LEARNER_RE.match(name):
            layers[m.group(2)].add(int(m.group(1)))
            ranks.add(value.shape[0] if m.group(4) == "0" else value.shape[1])
        elif m := ROUTER_RE.match(name):
            router_layers.add(int(m.group(1)))
            if m.group(2) == "weight":
                router_widths.add(value.shape[1])
        elif m := PROJECTOR_RE.match(name):
            projector_linears.add(int(m.group(1)))
        elif name.startswith(VISION_PREFIX) and (m := VISION_LAYER_RE.search(name)):
            vision_layers.add(int(m.group(1)))
    if not layers["attn_pool"]:
        raise ValueError("the checkpoint has no `model.layers.*.attn_pool.*` keys: it is not a Wings checkpoint "
                         "in the AIDC-AI/Wings layout")
    if len(ranks) != 1:
        raise ValueError(f"the learners disagree on their rank: found ranks {sorted(ranks)}")
    learner_layers = sorted(layers["attn_pool"])
    for kind in ("attn_t_pool",):
        if layers[kind] and sorted(layers[kind]) != learner_layers:
            raise ValueError(f"{kind} sits on layers {sorted(layers[kind])} but attn_pool on {learner_layers}")
    if router_layers and sorted(router_layers) != learner_layers:
        raise ValueError(f"reweight_module sits on layers {sorted(router_layers)} but attn_pool on {learner_layers}")
    if len(router_widths) > 1:
        raise ValueError(f"the routers disagree on their width: {sorted(router_widths)}")
    return OfficialLayout(
        learner_layers=learner_layers,
        has_visual=True,
        has_textual=bool(layers["attn_t_pool"]),
        has_router=bool(router_layers),
        rank=ranks.pop(),
        router_width=router_widths.pop() if router_widths else None,
        projector_type=projector_type(sorted(projector_linears)),
        vision_layers=max(vision_layers) + 1 if vision_layers else 0,
    )


def projector_type(linear_indices: list[int]) -> str:
    """[0] -> linear; [0, 2, ..., 2(n-1)] -> mlp{n}x_gelu (LLaVA's Sequential numbering)."""
    if not linear_indices:
        raise ValueError("the checkpoint has no `model.mm_projector.*` keys")
    if linear_indices == [0]:
        return "linear"
    if linear_indices != list(range(0, 2 * len(linear_indices), 2)):
        raise ValueError(f"unrecognised mm_projector layout: Linear layers at indices {linear_indices}")
    return f"mlp{len(linear_indices)}x_gelu"


def map_key(name: str, layout: OfficialLayout, model_keys: set[str]) -> str | None:
    """Our state-dict key for an official key; None when our model has no such tensor (reported as left over)."""
    if m := LEARNER_RE.match(name):
        layer, kind, proj, part = m.groups()
        candidate = (f"language_model.model.layers.{layer}.self_attn.{LEARNER_NAMES[kind]}.{proj}."
                     f"{LOW_RANK_NAMES[part]}.weight")
    elif m := ROUTER_RE.match(name):
        candidate = f"language_model.model.layers.{m.group(1)}.self_attn.router.linear.{m.group(2)}"
    elif m := PROJECTOR_RE.match(name):
        candidate = f"projector.{m.group(1)}.{m.group(2)}"
    elif name.startswith(VISION_PREFIX):
        rest = name[len(VISION_PREFIX):]
        bare = rest.removeprefix("vision_model.")
        # transformers 5's SiglipVisionModel keys have no `vision_model.` prefix; older layouts do.
        for candidate in (f"vision_tower.{bare}", f"vision_tower.vision_model.{bare}"):
            if candidate in model_keys:
                return candidate
        return None
    elif name.startswith("model.") or name.startswith("lm_head."):
        candidate = f"language_model.{name}"
    else:
        return None
    return candidate if candidate in model_keys else None
