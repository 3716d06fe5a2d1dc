"""`WingsSettings`: what `wings.attach` puts on a stock VLM, stored in its config as `config.wings` (a dict).

The fields and their meaning are `WingsConfig`'s learner and router fields (the same names, so a training stage's
`model.overrides: {use_textual_learner: true, use_router: true}` means the same for both kinds of model). Two
defaults differ on purpose: stock VLMs place a varying number of image tokens anywhere in long contexts, so the
router defaults to the layout-free `segment` type (the released model's `position` router is one column per
absolute position, 32K columns for a Qwen2-VL); and `stage` picks the learner set of a training stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..configuration import check_learner_fields, layer_indices, router_width

STAGE_PARTS = {1: dict(use_visual_learner=True, use_textual_learner=False, use_router=False),
               2: dict(use_visual_learner=True, use_textual_learner=True, use_router=True)}


@dataclass
class WingsSettings:
    """The Wings parts attached to a stock VLM.

    Args:
        learner_rank: rank r of every LoRRA projection (the released recipe uses 64).
        learner_layers: decoder layers that carry learners; None = all.
        use_visual_learner / use_textual_learner / use_router: which parts exist (stage 1: the visual learner
            only; stage 2: both learners and the router).
        router_type: "segment" (attention mass on image / text-before / text-after keys; the default here) or
            "position" (one column per absolute position, the released model's).
        router_max_positions: the position router's width; None = the text model's `max_position_embeddings`.
        router_mode / router_temperature: "learned" (softmax(SiLU(Linear(z)) / T)), or the "fixed" / "modality"
            ablations (see wings.modeling.router).
        router_impl: "sdpa" (the router's input from an extra attention channel) or "eager" (the reference).
    """

    learner_rank: int = 64
    learner_layers: list[int] | None = None
    use_visual_learner: bool = True
    use_textual_learner: bool = True
    use_router: bool = True
    router_type: str = "segment"
    router_max_positions: int | None = None
    router_mode: str = "learned"
    router_temperature: float = 1.0
    router_impl: str = "sdpa"

    @classmethod
    def for_stage(cls, stage: int, **fields: Any) -> WingsSettings:
        if stage not in STAGE_PARTS:
            raise ValueError(f"stage must be 1 (visual learner) or 2 (both learners and the router), got {stage!r}")
        return cls(**{**STAGE_PARTS[stage], **fields})

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "config.wings") -> WingsSettings:
        """From a stored `config.wings` (or adapter JSON); unknown keys are refused, naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a mapping of Wings settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where} has unknown Wings setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> WingsSettings:
        return WingsSettings.from_dict({**self.to_dict(), **changes}, where="the Wings setting overrides")

    def check(self, n_layers: int) -> None:
        check_learner_fields(self, n_layers, "wings")
        if not (self.use_visual_learner or self.use_textual_learner):
            raise ValueError("wings: at least one learner (use_visual_learner / use_textual_learner) must be on")
        if self.use_router and not (self.use_visual_learner and self.use_textual_learner):
            raise ValueError("wings: the router blends two learners; use_router needs both learners")

    def bind(self, text_config) -> LearnerSpec:
        """These settings with the text model's config: what `modeling.inject_learners` reads."""
        self.check(text_config.num_hidden_layers)
        return LearnerSpec(self, text_config)


class LearnerSpec:
    """Settings + the text model's config, with the attribute names `inject_learners` and `WingsRouter` read
    (the same as `WingsConfig`'s)."""

    def __init__(self, settings: WingsSettings, text_config):
        self.settings = settings
        self.text_config = text_config

    def __getattr__(self, name: str):
        settings = self.__dict__.get("settings")
        if settings is None:  # (while a copy or unpickling builds the object)
            raise AttributeError(name)
        return getattr(settings, name)

    @property
    def learner_layer_indices(self) -> list[int]:
        return layer_indices(self.settings.learner_layers, self.text_config.num_hidden_layers)

    @property
    def router_width(self) -> int:
        return router_width(self.settings.router_type, self.settings.router_max_positions, self.text_config)
