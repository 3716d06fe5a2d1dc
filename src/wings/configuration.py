"""`WingsConfig`: a vision encoder + projector + decoder LLM, with optional Wings learners and router."""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

Mode = Literal["wings", "llava"]
RouterType = Literal["position", "segment"]
Compat = Literal["none", "official"]
ROUTER_IMPLS = ("sdpa", "eager")
FEATURE_SELECT = ("default", "full")
COMPAT_MODES = ("none", "official")
ROUTER_MODES = ("learned", "fixed", "modality")


class WingsConfig(PreTrainedConfig):
    r"""Configuration of a Wings (or plain LLaVA-style) multimodal LLM.

    Args:
        vision_config: config of any HF vision encoder (SigLIP, CLIP, ...); built with `AutoModel.from_config`.
        text_config: config of any HF decoder LLM (Qwen2, Llama, Mistral, Qwen3, ...).
        image_token_id: id of the `<image>` token in the tokenizer; each image occupies
            `image_seq_length` consecutive copies of it after processing.
        image_seq_length: tokens per image (patches, plus CLS when `vision_feature_select_strategy="full"`).
        vision_feature_layer: which hidden state of the encoder feeds the projector (-2 = the paper's choice).
        vision_feature_select_strategy: "default" drops the CLS token of encoders that have one (CLIP); "full" keeps it.
        projector_type: "linear", "mlp{N}x_gelu" (e.g. "mlp2x_gelu", the paper's) or "identity".
        mode: "wings" adds learners (and optionally a router) to the LLM; "llava" is the plain baseline.
        learner_rank: rank r of every LoRRA projection (the released recipe uses 64).
        learner_layers: decoder layer indices that carry learners; None = all layers.
        use_visual_learner / use_textual_learner / use_router: which Wings parts exist (stage 1 has only the
            visual learner; stage 2 adds the textual learner and the router).
        router_type: "position" (Linear over absolute key positions, the released model's) or "segment"
            (Linear over the attention mass on image / pre-image text / post-image text keys, layout-free).
        router_max_positions: width of the position router; None = the LLM's `max_position_embeddings`.
        router_mode: how the per-token (visual, textual) weights are obtained. "learned" (the paper's and the
            default): the router's `softmax(SiLU(Linear(z)) / router_temperature)`; "fixed": exactly 0.5 / 0.5 at
            every token; "modality": exactly 1 / 0 on every token of a sample that carries an image and 0 / 1 on
            a text-only sample (no learned routing). The two ablation modes keep the router's weights (so a
            checkpoint loads in any mode) but never read them.
        router_temperature: softmax temperature of the learned router (1.0 = the paper's); below 1 sharpens it.
        router_impl: "sdpa" computes the router input with one extra SDPA call (O(T) memory); "eager"
            materialises the attention probabilities (the reference path used in tests).
        compat: "none" (corrected semantics) or "official" (reproduces the released checkpoint's inference).
        system_prompt_length: official compat only: leading tokens the released textual learner skips.
    """

    model_type = "wings"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 0
    image_seq_length: int | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_type: str = "mlp2x_gelu"
    mode: str = "wings"
    learner_rank: int = 64
    learner_layers: list[int] | None = None
    use_visual_learner: bool = True
    use_textual_learner: bool = True
    use_router: bool = True
    router_type: str = "position"
    router_max_positions: int | None = None
    router_mode: str = "learned"
    router_temperature: float = 1.0
    router_impl: str = "sdpa"
    compat: str = "none"
    system_prompt_length: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.image_seq_length is None:
            self.image_seq_length = default_image_seq_length(self.vision_config, self.vision_feature_select_strategy)
        self.validate_wings_fields()

    def validate_wings_fields(self) -> None:
        """Raise ValueError naming the field for any value the model cannot honour."""
        if self.mode not in ("wings", "llava"):
            raise ValueError(f"WingsConfig.mode must be 'wings' or 'llava', got {self.mode!r}")
        check_learner_fields(self, self.text_config.num_hidden_layers, "WingsConfig")
        if self.compat not in COMPAT_MODES:
            raise ValueError(f"WingsConfig.compat must be one of {COMPAT_MODES}, got {self.compat!r}")
        if self.vision_feature_select_strategy not in FEATURE_SELECT:
            raise ValueError(
                f"WingsConfig.vision_feature_select_strategy must be one of {FEATURE_SELECT}, "
                f"got {self.vision_feature_select_strategy!r}"
            )

    @property
    def learner_layer_indices(self) -> list[int]:
        if self.mode != "wings":
            return []
        return layer_indices(self.learner_layers, self.text_config.num_hidden_layers)

    @property
    def router_width(self) -> int:
        return router_width(self.router_type, self.router_max_positions, self.text_config)


# The learner and router fields are shared by `WingsConfig` and the settings of Wings attached to a stock VLM
# (wings.vlm.settings): one set of checks and derived values for both.


def check_learner_fields(fields, n_layers: int, owner: str) -> None:
    """Raise ValueError naming `owner.field` for a learner/router field value the model cannot honour."""
    if fields.router_type not in ("position", "segment"):
        raise ValueError(f"{owner}.router_type must be 'position' or 'segment', got {fields.router_type!r}")
    if fields.router_mode not in ROUTER_MODES:
        raise ValueError(f"{owner}.router_mode must be one of {ROUTER_MODES}, got {fields.router_mode!r}")
    temperature = fields.router_temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0.0 < temperature < float("inf")):
        raise ValueError(f"{owner}.router_temperature must be a positive number, got {temperature!r}")
    if fields.router_impl not in ROUTER_IMPLS:
        raise ValueError(f"{owner}.router_impl must be one of {ROUTER_IMPLS}, got {fields.router_impl!r}")
    rank = fields.learner_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{owner}.learner_rank must be an integer >= 1, got {rank!r}")
    for idx in fields.learner_layers or []:
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n_layers:
            raise ValueError(f"{owner}.learner_layers has {idx!r}, but the LLM has layers 0..{n_layers - 1}")
    width = fields.router_max_positions
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"{owner}.router_max_positions must be a positive integer or None, got {width!r}")


def layer_indices(learner_layers: list[int] | None, n_layers: int) -> list[int]:
    """The decoder layers that carry learners: the listed ones, or every layer."""
    return sorted(learner_layers) if learner_layers is not None else list(range(n_layers))


def router_width(router_type: str, max_positions: int | None, text_config: PreTrainedConfig) -> int:
    """Input width of the router's Linear: 3 segments, or one column per position the model can see."""
    if router_type == "segment":
        return 3  # image / text before the first image / text after an image
    if max_positions is not None:
        return max_positions
    return text_config.max_position_embeddings


def has_cls_token(vision_config: PreTrainedConfig) -> bool:
    """CLIP-like encoders prepend a class embedding; SigLIP-like ones do not."""
    return vision_config.model_type in ("clip_vision_model", "clip", "vit", "dinov2", "eva", "x_clip_vision_model")


def default_image_seq_length(vision_config: PreTrainedConfig, select_strategy: str) -> int:
    """Tokens per image the LLM sees: patches, plus the CLS token only when it is kept."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    keep_cls = has_cls_token(vision_config) and select_strategy == "full"
    return patches + int(keep_cls)
