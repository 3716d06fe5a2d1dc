"""The study's variants: what each one trains in stage 2, from which shared stage-1 model, on which data mix.

Every variant starts from one of the two stage-1 models the study trains once per seed (`llava_stage1`: projector
aligned, no learners; `wings_stage1`: projector and visual learners aligned) and runs one stage 2 with the demo's
sizes and rates, changed only where the variant says so. `stage2_sets` turns a variant into the `--set` overrides
of its stage YAML (configs/{llava,wings}_stage2.yaml).

The interpolation curve (`interp`) trains nothing: it mixes `llava_stage1` and the paper-mix LLaVA stage 2
weight by weight (wings.demo.interpolate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PAPER_MIX = 0.06  # LLaVA-665K: 40K text-only ShareGPT conversations of 665K
HIGH_MIX = 0.25
ROUTER_LR_SCALE = 10  # the router-LR option: 10x the recipe's router rate, without weight decay
ROUTER_TEMPERATURE = 0.25  # the temperature option
# LoRA on the LLM, alpha = 2 r (LLaVA-1.5's LoRA recipe), at the full-tuning LLM rate (the demo's 1e-3).
# LLaVA-1.5 trains its adapters at 10x its full-tuning rate (2e-4 vs 2e-5), but the demo's full-tuning rate is
# already 50x the recipe's. Measured at quick-study scale (seed 0, 300 stage-2 steps, rank 12, 1 thread;
# final training loss / held-out text / easy-vqa), LLaVA full tuning for reference 0.60 / 0.41 / 0.50:
#   LoRA 1e-2 (10x)  2.93 / 0.36 / 0.44  (grad-norm spikes, then stuck)
#   LoRA 3e-3 (3x)   1.87 / 0.36 / 0.48
#   LoRA 1e-3 (1x)   1.82 / 0.49 / 0.52  <- used
LORA_LR_SCALE = 1
INTERPOLATION_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Variant:
    """One stage-2 recipe of the study.

    Attributes:
        name: the key used in tables, folders and `--variants`.  label: what it is, in words.
        family: "llava" (starts from llava_stage1, configs/llava_stage2.yaml) or "wings" (wings_stage1,
            configs/wings_stage2.yaml); "interp" is computed, not trained.
        kind: "baseline", "ablation" or "router" (a router option).  text_mix: text-only share of stage 2.
        sets: extra `--set` overrides of the stage YAML (after the demo's own).
        start: which stage-1 model it starts from (default: its family's).
    """

    name: str
    label: str
    family: str
    kind: str
    text_mix: float = PAPER_MIX
    sets: tuple[str, ...] = ()
    start: str | None = None
    notes: dict = field(default_factory=dict, compare=False)

    @property
    def start_stage(self) -> str:
        return self.start or f"{self.family}_stage1"

    @property
    def has_router(self) -> bool:
        return self.family == "wings" and "model.overrides.use_router=false" not in self.sets

    @property
    def learned_router(self) -> bool:
        return self.has_router and not any(s.startswith("model.overrides.router_mode=") for s in self.sets)


_NO_ROUTER = ("model.overrides.use_router=false", "groups.router.train=false")
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("llava_r0", "LLaVA full tuning, no text replay", "llava", "baseline", text_mix=0.0),
    Variant("llava", "LLaVA full tuning, 6% text replay (the paper's mix)", "llava", "baseline"),
    Variant("llava_r25", "LLaVA full tuning, 25% text replay", "llava", "baseline", text_mix=HIGH_MIX),
    Variant("frozen_llm", "LLaVA with the LLM frozen (projector only)", "llava", "baseline",
            sets=("groups.llm.train=false",)),
    Variant("lora", "LoRA on the LLM (+ projector), as many trainable weights as Wings' learners", "llava",
            "baseline", sets=("groups.llm.train=false", "lora.enabled=true", "lora.dropout=0.0")),
    Variant("interp", "LLaVA (6% replay) interpolated toward its stage-1 model (base LLM weights)", "interp",
            "baseline"),
    Variant("wings", "Wings as released (learned router)", "wings", "ablation"),
    Variant("wings_fixed", "Wings, router fixed at 0.5", "wings", "ablation",
            sets=("model.overrides.router_mode=fixed", "groups.router.train=false")),
    Variant("wings_modality", "Wings, routed by modality (w_v 1 on image samples, 0 on text-only)", "wings",
            "ablation", sets=("model.overrides.router_mode=modality", "groups.router.train=false")),
    Variant("wings_no_textual", "Wings without the textual learner (visual learner only)", "wings", "ablation",
            sets=("model.overrides.use_textual_learner=false", "groups.textual_learner.train=false", *_NO_ROUTER)),
    Variant("wings_no_visual", "Wings without the visual learner (textual learner only, from LLaVA's stage 1)",
            "wings", "ablation", start="llava_stage1",
            sets=("model.overrides.mode=wings", "model.overrides.use_visual_learner=false",
                  "groups.visual_learner.train=false", *_NO_ROUTER)),
    Variant("wings_frozen_llm", "Wings with the LLM frozen in stage 2", "wings", "ablation",
            sets=("groups.llm.train=false",)),
    Variant("wings_router_lr", f"Wings, router at {ROUTER_LR_SCALE}x its rate, no weight decay", "wings", "router",
            sets=("groups.router.weight_decay=0.0",)),
    Variant("wings_router_t", f"Wings, router softmax temperature {ROUTER_TEMPERATURE}", "wings", "router",
            sets=(f"model.overrides.router_temperature={ROUTER_TEMPERATURE}",)),
)}
HEADLINE = ("llava_r0", "llava", "llava_r25", "frozen_llm", "lora", "wings", "wings_fixed", "wings_modality",
            "wings_no_textual", "wings_no_visual")


def parse_variants(spec: str | None) -> list[str]:
    """`--variants a,b,...` -> names in the registry's order (None or "all": every variant). Unknown names are an
    error naming them; `interp` pulls in `llava`, which it interpolates."""
    if spec is None or spec.strip() in ("", "all"):
        return list(VARIANTS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if "interp" in names and "llava" not in names:
        names.append("llava")
    return [n for n in VARIANTS if n in names]


def stage2_sets(variant: Variant, stage_lrs: dict[str, float], text_train: Path, lora_rank: int | None) -> list[str]:
    """The variant's own `--set` overrides (data mix, rates, LoRA size) on top of the demo's stage-2 ones."""
    sets = []
    if variant.text_mix:
        sets += [f"data.text_mix_path={text_train}", f"data.text_mix_ratio={variant.text_mix}"]
    else:
        sets += ["data.text_mix_path=null", "data.text_mix_ratio=0.0"]
    if variant.name == "lora":
        if lora_rank is None:
            raise ValueError("the lora variant needs the matched rank (matched_lora_rank)")
        sets += [f"lora.r={lora_rank}", f"lora.alpha={2 * lora_rank}", f"lora.lr={stage_lrs['llm'] * LORA_LR_SCALE}"]
    if variant.name == "wings_router_lr":
        sets += [f"groups.router.lr={stage_lrs['router'] * ROUTER_LR_SCALE}"]
    return sets + list(variant.sets)


def trained_groups(variant: Variant) -> set[str]:
    """The parameter groups the variant's stage 2 trains (checked by the tests against what really moved)."""
    if variant.family == "llava":
        groups = {"projector"} | ({"lora"} if variant.name == "lora" else set())
        return groups | ({"llm"} if not any(s == "groups.llm.train=false" for s in variant.sets) else set())
    groups = {"projector", "llm", "visual_learner", "textual_learner", "router"}
    for s in variant.sets:
        if s.startswith("groups.") and s.endswith(".train=false"):
            groups.discard(s.split(".")[1])
    return groups


# ---------------------------------------------------------------------------------------------------------------
# LoRA sized like Wings' learners


def learner_parameter_count(config) -> int:
    """Trainable weights of Wings' two learners in stage 2: per learner and layer, q/k/v/o low-rank pairs
    (down r x d, up d x r)."""
    d, r = config.text_config.hidden_size, config.learner_rank
    layers = config.learner_layers if config.learner_layers is not None else range(config.text_config.num_hidden_layers)
    return 2 * len(layers) * 4 * 2 * r * d


def lora_parameter_count(model, rank: int, targets: list[str]) -> int:
    """LoRA weights `rank * (in + out)` over the base LLM's linear layers that `targets` names."""
    import re

    from torch import nn

    from ..training.stages import lora_target_regex

    pattern = re.compile(lora_target_regex(targets))
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and pattern.fullmatch(name))


def matched_lora_rank(model, target: int, targets: list[str]) -> int:
    """The LoRA rank whose weight count is nearest to `target` (Wings' learners)."""
    per_rank = lora_parameter_count(model, 1, targets)
    if per_rank == 0:
        raise ValueError(f"LoRA targets {targets} match no linear layer of the LLM")
    return max(1, round(target / per_rank))
